"""``usfmae-fast`` command line: ``info`` (what is available here and why not), ``selftest``
(every kernel usable here against ops/reference.py), ``demo``,
``ingest`` (raw ultrasound files -> clean images + manifest.csv), ``pretrain`` (the MAE
pretraining engine; several processes through ``torchrun ... -m usfmae_fast.cli pretrain``),
``scorecam`` (heatmaps of a classifier's decisions), ``finetune`` / ``evaluate`` / ``predict`` /
``embed`` (the clinical protocol, in ``finetune/cli.py``), ``bench`` (the benchmark suites).

Exit codes (every command): 0 done; 2 bad input (arguments, labels, configs, checkpoints,
missing files, an output folder another run holds), reported before the work starts; 1 the
work failed (files ingest could not read with --strict, a failed selftest or bench suite,
any unexpected error); 3 a run that stopped itself (pretraining diverged). The reason is
printed on stderr as "usfmae-fast COMMAND: ..."."""
from __future__ import annotations

import argparse
import json
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


def _info(args: argparse.Namespace) -> int:
    from .info import collect, render
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from .ops import _backend, _trust
    for flag, given, known in (("--op", args.op, _backend._OPS), ("--backend", args.backend,
                               _backend.BACKENDS), ("--dtype", args.dtype, _trust.DTYPES)):
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            raise CommandExit(EXIT_BAD_INPUT, ValueError(
                f"{flag} {', '.join(unknown)} is not one of {', '.join(sorted(known))}"))
    rows = _trust.selftest(args.op, args.backend, args.dtype)
    failed = any(r["status"] == "fail" for r in rows)
    if args.json:
        print(json.dumps({"passed": not failed, "rows": rows}, indent=2))
    else:
        print(_trust.render(rows))
    return EXIT_FAILURE if failed else 0


def _add_selftest(sub) -> None:
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


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    fields = {"out_dir": args.out, "labels": args.labels, "masks": args.masks, "seed": args.seed, "pretrain_steps": args.steps,
              "finetune_epochs": args.epochs, "folds": args.folds, "threads": args.threads,
              "models": tuple(args.models.split(",")) if args.models else None,
              "progress": not args.quiet}
    given = {k: v for k, v in fields.items() if v is not None}
    cfg = DemoConfig.quick(**given) if args.quick else DemoConfig(**given)
    with exit_on(bad_input=(ValueError,)):  # bad labels / splits / settings, before training
        run_demo(cfg)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole story on offline data: ingest -> pretrain -> "
                       "fine-tune (k-fold + test set, baselines) -> Score-CAM -> report.md",
                       description="Ingests the pydicom-data ultrasound DICOMs, pretrains a small "
                       "ViT-MAE, fine-tunes it on the simulated B-mode set against a ViT from "
                       "scratch and DenseNet-169, explains the best model with Score-CAM and "
                       "writes OUT/report.md (see usfmae_fast/demo.py).")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="CI size: 6 subjects per class, 2 folds, 20 steps, 2 epochs, 32 px")
    p.add_argument("--steps", type=int, help="MAE pretraining steps (default: 600)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs per fold (default: 15)")
    p.add_argument("--folds", type=int, help="cross-validation folds (default: 5)")
    p.add_argument("--models", help="comma-separated, default usfmae,vit_scratch,densenet169")
    p.add_argument("--labels", help="labelled set to fine-tune on: CSV path,label,patient_id "
                   "(default: the simulated set in usfmae_fast/demo_data/bmode_sim)")
    p.add_argument("--masks", help="lesion masks of that set, named like its images")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: the idle cores)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_demo)


def _ingest(args: argparse.Namespace) -> int:
    from .data.ingest import IngestError, ingest
    with exit_on(bad_input=(), failure=(IngestError,)):
        summary = ingest(args.sources, args.out, workers=args.workers,
                         shard_size=args.shard_size, strict=args.strict,
                         progress=not args.quiet, max_side=args.max_side,
                         keep_color=args.color, image_format=args.format,
                         jpeg_quality=args.quality, frame_stride=args.frame_stride,
                         nifti_axis=args.nifti_axis, crop=not args.no_crop,
                         remove_text=not args.no_inpaint, near_dup_bits=args.near_dup_bits,
                         max_pixels=args.max_pixels)
    print(json.dumps(summary, indent=2))
    return 0


def _add_ingest(sub) -> None:
    from .data.ingest import IngestOptions
    default = IngestOptions()
    p = sub.add_parser("ingest", help="DICOM / NIfTI / image / video files -> clean 8-bit images "
                       "+ manifest.csv (resumable)")
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-side", type=int, default=default.max_side,
                   help="longer side of the images written (default: %(default)s)")
    p.add_argument("--color", action="store_true", help="keep colour (e.g. Doppler) instead of gray")
    p.add_argument("--format", choices=["png", "jpeg"], default=default.image_format,
                   help="image format (default: %(default)s)")
    p.add_argument("--quality", type=int, default=default.jpeg_quality,
                   help="JPEG quality (default: %(default)s)")
    p.add_argument("--frame-stride", type=int, default=default.frame_stride,
                   help="keep every n-th frame of cine loops and videos (default: %(default)s)")
    p.add_argument("--nifti-axis", type=int, default=default.nifti_axis,
                   help="axis 3-D NIfTI volumes are sliced along (default: %(default)s)")
    p.add_argument("--no-crop", action="store_true", help="keep whole frames")
    p.add_argument("--no-inpaint", action="store_true", help="keep burned-in text and calipers")
    p.add_argument("--near-dup-bits", type=int, default=default.near_dup_bits,
                   help="frames of one file within this many bits of the last kept one's 256-bit "
                   "difference hash are dropped; -1 keeps them (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=default.max_pixels,
                   help="most pixels read from one file, frames x width x height (after "
                   "--frame-stride); larger files are reported as errors before decoding "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--shard-size", type=int, default=0,
                   help="also write webdataset tar shards of this many images (default: none)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file could not be read")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_ingest)


# flag -> config field; each given flag becomes an override, applied before --set
PRETRAIN_FLAGS = {
    "data": "data.source", "out": "output.out_dir", "resume": "output.resume",
    "steps": "optim.steps", "epochs": "optim.epochs", "batch_size": "optim.batch_size",
    "accum_steps": "optim.accum_steps", "lr": "optim.lr", "blr": "optim.blr",
    "model": "model.size", "img_size": "model.img_size", "init_from": "model.init_from",
    "precision": "system.precision", "device": "system.device",
    "ops_backend": "system.ops_backend", "seed": "system.seed", "threads": "system.num_threads",
    "save_every": "output.save_every",
}


def _pretrain(args: argparse.Namespace) -> int:
    from .models.checkpoint import CheckpointError
    from .pretrain.config import ConfigError, build_config
    from .pretrain.engine import TrainingDiverged, pretrain

    overrides = {field: getattr(args, flag) for flag, field in PRETRAIN_FLAGS.items()
                 if getattr(args, flag) is not None}
    switches = {"compile": "system.compile", "fsdp": "system.distributed",
                "activation_checkpointing": "system.activation_checkpointing",
                "overwrite": "output.overwrite"}
    for flag, field in switches.items():
        if getattr(args, flag):
            overrides[field] = "fsdp" if flag == "fsdp" else True
    if args.quiet:
        overrides["output.progress"] = False
    if args.epochs is not None and args.steps is None:
        overrides["optim.steps"] = None  # the run length in epochs, not a preset's steps
    with exit_on(bad_input=(ConfigError,)):
        cfg = build_config(args.preset, args.config, {**overrides, **_dotted(args.set or [])})
    with exit_on(bad_input=(FileExistsError, FileNotFoundError, CheckpointError),  # --out /
                 stopped=(TrainingDiverged,)):               # --data / --resume / --init-from
        summary = pretrain(cfg)
    if "artefacts" in summary and not args.quiet:
        for name, path in summary["artefacts"].items():
            print(f"  {name:15s} {path}")
    return 0


def _dotted(items: list[str]) -> dict:
    from .pretrain.config import parse_override  # raises ConfigError on a malformed item
    return {f"{section}.{name}": value for section, name, value in map(parse_override, items)}


def _add_pretrain(sub) -> None:
    from .pretrain.config import CONFIG_PRESETS
    from .runtime.precision import PRECISIONS
    p = sub.add_parser("pretrain", help="MAE pretraining (DDP via torchrun, exact resume, logs, "
                       "figures)", description="Config: defaults <- --preset <- --config <- "
                       "flags <- --set section.field=value (fields: see usfmae_fast/pretrain/"
                       "config.py).")
    p.add_argument("--config", help="YAML file of sections model/data/optim/system/output")
    p.add_argument("--preset", choices=sorted(CONFIG_PRESETS), help="a recipe (default: mae)")
    p.add_argument("--data", help="'demo' (pydicom-data frames), an ingest folder, "
                   "manifest.csv or .tar shards")
    p.add_argument("--out", help="run folder: logs, checkpoints, figures")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in --out) or a path")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out, deleting an earlier run's checkpoints")
    p.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    p.add_argument("--epochs", type=float, help="run length in epochs")
    p.add_argument("--batch-size", type=int, help="global batch per optimizer step")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation micro-steps")
    p.add_argument("--lr", type=float, help="absolute peak lr (else blr x batch / 256)")
    p.add_argument("--blr", type=float)
    p.add_argument("--model", help="encoder size: tiny, small, base, large, huge")
    p.add_argument("--img-size", type=int)
    p.add_argument("--init-from", help="MAE checkpoint to start from")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--ops-backend", help="usfmae_fast.ops backend: auto, torch, cpu, cuda, triton")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP (ViT-L / H)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="any config field, e.g. --set optim.clip_grad=1.0 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretrain)


def _add_scorecam(sub) -> None:
    from .runtime.precision import PRECISIONS

    def run(args: argparse.Namespace) -> int:
        from .explain.run import explain_images
        with exit_on():
            summary = explain_images(
                args.ckpt, args.images, args.out, model_name=args.model, class_idx=args.class_idx,
                target_layer=args.layer, masks=args.masks, device=args.device, dtype=args.dtype,
                score=args.score, weights=args.weights, batch_size=args.batch_size,
                tolerance=args.tolerance, colormap=args.colormap, alpha=args.alpha)
        print(json.dumps({k: v for k, v in summary.items() if k != "images"}, indent=2))
        return 0

    p = sub.add_parser("scorecam", help="Score-CAM heatmaps, overlays and a grid for images "
                       "(+ pointing game / energy in lesion masks)",
                       description="Score-CAM of a timm classifier checkpoint (safetensors or "
                       ".pth/.pt state dict with its head; the architecture from --model or the "
                       "checkpoint's 'arch' entry; see usfmae_fast.models.classifier) on PNG / "
                       "JPEG images resized to the model's input. Writes OUT/heatmaps/*.npy, "
                       "OUT/overlays/*.png, OUT/grid.png and OUT/summary.json.")
    p.add_argument("--ckpt", required=True, help="classifier checkpoint (.safetensors/.pth/.pt)")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files or folders (searched recursively)")
    p.add_argument("--model", default=None, help="timm model name, e.g. "
                   "usfmae_vit_base_patch16_224 or densenet169 (default: the checkpoint's 'arch')")
    p.add_argument("--class", dest="class_idx", type=int, default=None,
                   help="class to explain (default: each image's predicted class)")
    p.add_argument("--out", default="outputs/scorecam", help="output folder (default: %(default)s)")
    p.add_argument("--masks", default=None, help="folder of lesion masks named like the images "
                   "(stem or stem_mask, nonzero = lesion; searched recursively): adds pointing "
                   "game and energy in mask")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="pointing-game tolerance in pixels (default: %(default)s)")
    p.add_argument("--layer", default=None, help="target layer name (default: the last block's "
                   "norm1 of a ViT, features.norm5 of a DenseNet)")
    p.add_argument("--score", choices=["logit", "softmax"], default="logit",
                   help="class score of a masked input (default: %(default)s)")
    p.add_argument("--weights", choices=["softmax", "raw"], default="softmax", help="channel "
                   "weights: softmax of the scores (grad-cam) or the scores (paper) "
                   "(default: %(default)s)")
    p.add_argument("--dtype", choices=PRECISIONS, default="fp32",
                   help="autocast precision of the forward passes (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="masked inputs per forward pass (default: from the memory budget)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--colormap", default="jet", help="matplotlib colormap (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="heatmap opacity in the overlays (default: %(default)s)")
    p.set_defaults(func=run)


def _add_bench(sub) -> None:
    from .bench import SUITES

    def run(args: argparse.Namespace) -> int:
        from .bench import run_bench
        with exit_on():
            provenance = run_bench(args.suites, args.out, suites_dir=args.suites_dir,
                                   select=args.select)
        failed = [r["file"] for r in provenance["suites"] if r["status"].startswith("failed")]
        return EXIT_FAILURE if failed else 0

    p = sub.add_parser("bench", help="run the benchmark suites that fit this device; JSON, "
                       "summary table, plot and provenance", description="Runs benchmarks/"
                       "bench_*.py with pytest-benchmark (see benchmarks/README.md); exit 1 "
                       "when a suite fails.")
    p.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=None,
                   help="suites to run (default: all)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/"
                   "run-<device>-<date>)")
    p.add_argument("-k", dest="select", default=None,
                   help="pytest -k expression selecting cases, e.g. 'cpu and not compile'")
    p.add_argument("--suites-dir", default=None,
                   help="the benchmarks/ folder (default: the checkout's)")
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usfmae-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, usable backends and why others are not")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_info)
    _add_selftest(sub)
    _add_demo(sub)
    _add_ingest(sub)
    _add_pretrain(sub)
    _add_scorecam(sub)
    from .finetune.cli import add_commands  # finetune, evaluate, predict, embed
    add_commands(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .runtime.lock import FolderBusy

    args = build_parser().parse_args(argv)
    try:
        with exit_on(bad_input=(FolderBusy,)):  # one run per output folder
            return args.func(args)
    except CommandExit as stop:
        print(f"usfmae-fast {args.command}: {stop.error}", file=sys.stderr)
        return stop.code


if __name__ == "__main__":
    sys.exit(main())
