"""``usfmae-fast pretrain``: the MAE pretraining engine (several processes through
``torchrun ... -m usfmae_fast.cli pretrain``)."""
from __future__ import annotations

import argparse

from . import exit_on


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
    from ..models.checkpoint import CheckpointError
    from ..pretrain.config import ConfigError, build_config
    from ..pretrain.engine import TrainingDiverged, pretrain

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
    with exit_on(bad_input=(ConfigError, FileExistsError, FileNotFoundError, CheckpointError),
                 stopped=(TrainingDiverged,)):  # data.source unset / --out / --data / --resume
        summary = pretrain(cfg)
    if "artefacts" in summary and not args.quiet:
        for name, path in summary["artefacts"].items():
            print(f"  {name:15s} {path}")
    return 0


def _dotted(items: list[str]) -> dict:
    from ..pretrain.config import parse_override  # raises ConfigError on a malformed item
    return {f"{section}.{name}": value for section, name, value in map(parse_override, items)}


def add_commands(sub) -> None:
    """Register ``pretrain``."""
    from ..pretrain.config import CONFIG_PRESETS
    from ..runtime.precision import PRECISIONS
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
    p.add_argument("--init-from", help="MAE checkpoint to start from (a file, or a Hugging "
                   "Face ViTMAE / ViT folder)")
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
