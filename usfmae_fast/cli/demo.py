"""``usfmae-fast demo``: the whole story on offline data (see usfmae_fast/demo.py)."""
from __future__ import annotations

import argparse

from . import exit_on


def _demo(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo
    fields = {"out_dir": args.out, "labels": args.labels, "masks": args.masks, "seed": args.seed, "pretrain_steps": args.steps,
              "finetune_epochs": args.epochs, "folds": args.folds, "threads": args.threads,
              "models": tuple(args.models.split(",")) if args.models else None,
              "progress": not args.quiet}
    given = {k: v for k, v in fields.items() if v is not None}
    cfg = DemoConfig.quick(**given) if args.quick else DemoConfig(**given)
    with exit_on(bad_input=(ValueError,)):  # bad labels / splits / settings, before training
        run_demo(cfg)
    return 0


def add_commands(sub) -> None:
    """Register ``demo``."""
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
