"""``usfmae-fast demo``: the whole story on offline data (see usfmae_fast/demo.py)."""
from __future__ import annotations

import argparse

from . import add_config_args, exit_on


CONFIG_ORDER = ("Config: the DemoConfig defaults (--quick: the CI size) <- --config FILE.yaml "
                "<- the flags given <- --set key=value (repeatable).")


def config_from_args(args: argparse.Namespace):
    """The validated ``DemoConfig`` of ``demo``'s arguments: defaults (or ``--quick``'s) <-
    ``--config`` <- the flags given <- ``--set``."""
    from ..demo import DemoConfig
    from ..runtime.config import build
    fields = {"out_dir": args.out, "labels": args.labels, "masks": args.masks, "seed": args.seed,
              "pretrain_steps": args.steps, "finetune_epochs": args.epochs, "folds": args.folds,
              "threads": args.threads,
              "models": tuple(args.models.split(",")) if args.models else None,
              "progress": False if args.quiet else None}
    given = {k: v for k, v in fields.items() if v is not None}
    base = DemoConfig.quick() if args.quick else DemoConfig()
    return build(base, args.config, given, args.set or [])


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    with exit_on(bad_input=(ValueError,)):  # bad labels / splits / settings, before training
        cfg = config_from_args(args)
        run_demo(cfg)
    return 0


def add_commands(sub) -> None:
    """Register ``demo``."""
    from ..demo import DemoConfig
    from ..runtime.config import help_for
    p = sub.add_parser("demo", help="the whole story on offline data: ingest -> pretrain -> "
                       "fine-tune (k-fold + test set, baselines) -> Score-CAM -> report.md",
                       description="Ingests the pydicom-data ultrasound DICOMs, pretrains a small "
                       "ViT-MAE, fine-tunes it on the simulated B-mode set against a ViT from "
                       "scratch and a ResNet-18, explains the best model with Score-CAM and "
                       "writes OUT/report.md (see usfmae_fast/demo.py). " + CONFIG_ORDER)
    add_config_args(p, "DemoConfig", "finetune_lr=1e-3")
    p.add_argument("--out", help=help_for(DemoConfig, "out_dir", "output folder"))
    p.add_argument("--quick", action="store_true",
                   help="CI size: 6 subjects per class, 2 folds, 20 steps, 2 epochs, 32 px")
    p.add_argument("--steps", type=int, help=help_for(DemoConfig, "pretrain_steps",
                                                              "MAE pretraining steps"))
    p.add_argument("--epochs", type=int, help=help_for(DemoConfig, "finetune_epochs",
                                                               "fine-tuning epochs per fold"))
    p.add_argument("--folds", type=int, help=help_for(DemoConfig, "folds", "cross-validation folds"))
    p.add_argument("--models", help=help_for(DemoConfig, "models", "comma-separated"))
    p.add_argument("--labels", help="labelled set to fine-tune on: CSV path,label,patient_id "
                   "(default: the simulated set in usfmae_fast/demo_data/bmode_sim)")
    p.add_argument("--masks", help="lesion masks of that set, named like its images")
    p.add_argument("--seed", type=int, help=help_for(DemoConfig, "seed", "random seed"))
    p.add_argument("--threads", type=int, help="torch threads (default: the idle cores)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_demo)
