"""``usfmae-fast`` command line: ``info`` (what is available here and why not), ``selftest``
(every kernel usable here against ops/reference.py), ``demo``,
``ingest`` (raw ultrasound files -> clean images + manifest.csv), ``pretrain`` (the MAE
pretraining engine; several processes through ``torchrun ... -m usfmae_fast.cli pretrain``),
``scorecam`` (heatmaps of a classifier's decisions), ``finetune`` / ``evaluate`` / ``predict`` /
``embed`` (the clinical protocol), ``export`` (checkpoints as Hugging Face, ONNX or timm
files), ``bench`` (the benchmark suites).

Exit codes (every command): 0 done; 2 bad input (arguments, labels, configs, checkpoints,
missing files, an output folder another run holds), reported before the work starts; 1 the
work failed (files ingest could not read with --strict, a failed selftest or bench suite,
any unexpected error); 3 a run that stopped itself (pretraining diverged). The reason is
printed on stderr as "usfmae-fast COMMAND: ..."."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 3
INPUT_ERRORS = (ValueError, FileNotFoundError)  # LabelError, SplitError, ConfigError: ValueErrors


class CommandExit(Exception):
    """Ends a command with ``code``; :func:`main` prints ``error`` on stderr."""

    def __init__(self, code: int, error: BaseException):
        super().__init__(str(error))
        self.code, self.error = code, error


@contextmanager
def exit_on(bad_input: tuple = INPUT_ERRORS, failure: tuple = (), stopped: tuple = ()):
    """The one error-to-exit mapping: an exception of ``bad_input`` / ``failure`` /
    ``stopped`` raised in the block ends the command with 2 / 1 / 3 (see the module
    docstring); anything else propagates."""
    try:
        yield
    except bad_input as exc:
        raise CommandExit(EXIT_BAD_INPUT, exc) from exc
    except failure as exc:
        raise CommandExit(EXIT_FAILURE, exc) from exc
    except stopped as exc:
        raise CommandExit(EXIT_STOPPED, exc) from exc


def add_config_args(p: argparse.ArgumentParser, what: str, example: str) -> None:
    """``--config FILE.yaml`` and ``--set KEY=VALUE``, as every configurable command takes them
    (runtime/config.py builds the dataclass from both)."""
    p.add_argument("--config", metavar="FILE.yaml", help=f"YAML mapping of {what} fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help=f"any {what} field, e.g. --set {example} (repeatable; wins over "
                   "--config and the flags)")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, demo, export, finetune, info, ingest, pretrain, scorecam
    parser = argparse.ArgumentParser(prog="usfmae-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (info, demo, ingest, pretrain, scorecam, finetune, export, bench):  # the --help order
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..runtime.lock import FolderBusy

    args = build_parser().parse_args(argv)
    try:
        with exit_on(bad_input=(FolderBusy,)):  # one run per output folder
            return args.func(args)
    except CommandExit as stop:
        print(f"usfmae-fast {args.command}: {stop.error}", file=sys.stderr)
        return stop.code

