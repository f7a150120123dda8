"""``usfmae-fast info`` (what is available here and why not) and ``selftest`` (every kernel
usable here against ops/reference.py)."""
from __future__ import annotations

import argparse
import json

from . import EXIT_BAD_INPUT, EXIT_FAILURE, CommandExit


def _info(args: argparse.Namespace) -> int:
    from ..info import collect, render
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from .. import ops
    for flag, given, known in (("--op", args.op, ops.OPS), ("--backend", args.backend,
                               ops.BACKENDS), ("--dtype", args.dtype, ops.SELFTEST_DTYPES)):
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            raise CommandExit(EXIT_BAD_INPUT, ValueError(
                f"{flag} {', '.join(unknown)} is not one of {', '.join(sorted(known))}"))
    rows = ops.selftest(args.op, args.backend, args.dtype)
    failed = any(r["status"] == "fail" for r in rows)
    if args.json:
        print(json.dumps({"passed": not failed, "rows": rows}, indent=2))
    else:
        print(ops.render_selftest(rows))
    return EXIT_FAILURE if failed else 0


def add_commands(sub) -> None:
    """Register ``info`` and ``selftest``."""
    info = sub.add_parser("info", help="versions, device, usable backends and why others are not")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_info)
    p = sub.add_parser("selftest", help="check every kernel this machine can run against "
                       "ops/reference.py; exit 1 on any failure",
                       description="Runs each compiled and Triton kernel usable here on small "
                       "inputs of the ViT cases, forward and backward, against ops/reference.py "
                       "(the check every kernel gets on first use) and prints op x backend x "
                       "dtype: pass / fail / n/a and why.")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--op", nargs="+", default=None, help="only these ops")
    p.add_argument("--backend", nargs="+", default=None, help="only these backends")
    p.add_argument("--dtype", nargs="+", default=None, help="only these dtypes")
    p.set_defaults(func=_selftest)
