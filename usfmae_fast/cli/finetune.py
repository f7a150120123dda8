"""``usfmae-fast finetune | evaluate | predict | embed``: the clinical protocol (usfmae_fast/finetune/).

Bad input (labels, classes, splits, checkpoints, model names, hyper-parameters) is reported
before any training, on stderr, with exit code 2 (the mapping of ``usfmae_fast.cli.exit_on``).
"""
from __future__ import annotations

import argparse
import json

from . import add_config_args, exit_on
from ..data import LOADER_BACKENDS
from ..data.load.image_files import CHECKS
from ..finetune.config import (SELECTIONS, THRESHOLD_RULES, EvaluateConfig, ProtocolConfig,
                               TrainConfig)
from ..runtime.config import help_for
from ..runtime.precision import FINETUNE_PRECISIONS

CONFIG_ORDER = ("Config: the defaults (shown below; --quick starts from a smaller run) <- "
                "--config FILE.yaml <- the flags given <- --set key=value (repeatable).")


# TrainConfig fields settable by a flag of the same name (dashes for underscores)
TRAIN_FLAGS = {
    "epochs": (int, "training epochs per fold"),
    "batch_size": (int, "images per step"),
    "blr": (float, "fine-tuning base lr; lr = blr x batch / 256"),
    "probe_blr": (float, "linear-probe base lr"),
    "lr": (float, "absolute peak lr (instead of blr / probe-blr)"),
    "min_lr": (float, "final lr of the cosine"),
    "warmup_epochs": (float, "linear warmup epochs"),
    "weight_decay": (float, "AdamW weight decay"),
    "layer_decay": (float, "layer-wise lr decay of pretrained ViTs, 1 = off"),
    "drop_path": (float, "stochastic depth rate"),
    "smoothing": (float, "label smoothing"),
    "mixup": (float, "timm Mixup alpha, 0 = off"),
    "cutmix": (float, "timm CutMix alpha, 0 = off"),
    "patience": (int, "early stopping: epochs without a better validation AUC, 0 = never"),
    "clip_grad": (float, "gradient norm clipping"),
    "img_size": (int, "input size in pixels"),
    "in_chans": (int, "1 (gray, default) or 3 (RGB)"),
    "vit_size": (str, "vit_scratch's size without --init: tiny/small/base/large/huge"),
    "mean": (float, "normalisation mean (default: the pretraining run's, else 0.15)"),
    "std": (float, "normalisation std (default: the pretraining run's, else 0.20)"),
    "rotate": (float, "max random rotation in degrees while training"),
    "crop_min": (float, "smallest random-crop area fraction while training"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "workers": (int, "loader threads / processes"),
    "threads": (int, "torch CPU threads"),
}
TRAIN_FLAGS_OWN_DEFAULT = ("lr", "in_chans", "mean", "std", "workers", "threads")  # told in text
TRAIN_CHOICES = {"imbalance": ("none", "weights", "sampler"), "global_pool": ("avg", "token"),
                 "precision": FINETUNE_PRECISIONS, "backend": LOADER_BACKENDS}


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"lr_grid: {text!r} is not a comma-separated list of numbers") from exc


def _weights(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"weights: {item!r} is not NAME=PATH (e.g. densenet169=d.pth)")
        pairs[name.strip()] = path.strip()
    return pairs


def config_from_args(args: argparse.Namespace) -> ProtocolConfig:
    """The validated :class:`ProtocolConfig` of ``finetune``'s arguments: defaults (or
    ``--quick``'s) <- ``--config`` <- the flags given <- ``--set``; ``ConfigError`` /
    ``ValueError`` on a bad key or value."""
    from ..finetune.protocol import quick_config
    from ..runtime.config import build

    flags = {f"train.{f}": getattr(args, f) for f in [*TRAIN_FLAGS, *TRAIN_CHOICES]
             if getattr(args, f) is not None}
    if flags.get("train.patience") == 0:
        flags["train.patience"] = None
    if args.quiet:
        flags["train.progress"] = False
    protocol = dict(
        out_dir=args.out, models=_names(args.models), init=args.init,
        weights=_weights(args.weights) if args.weights else None,
        classes=_names(args.classes), positive=args.positive, test_labels=args.test_labels,
        folds=args.folds, test_size=args.test_size, seed=args.seed, n_boot=args.n_boot,
        check=args.check, allow_outside_root=args.allow_outside_root or None, title=args.title,
        selection=args.selection, inner_size=args.inner_size, lr_grid=_floats(args.lr_grid),
        threshold=args.threshold,
        target_sensitivity=args.target_sensitivity, temperature=args.temperature or None)
    flags.update({k: v for k, v in protocol.items() if v is not None})
    base = quick_config(args.labels, ProtocolConfig.out_dir) if args.quick else \
        ProtocolConfig(args.labels)
    return build(base, args.config, flags, args.set or [])


def _finetune(args: argparse.Namespace) -> int:
    from ..runtime.lock import check_free
    from ..finetune.protocol import prepare, run_protocol

    with exit_on():
        cfg = config_from_args(args)
    check_free(cfg.out_dir)  # a second run into a busy folder fails now, not after the checks
    with exit_on():
        plan = prepare(cfg)
    report = run_protocol(cfg, plan)
    for name, model in report["models"].items():
        cv = model["cv"]["summary"]["auc"]
        line = f"{name:24s} CV AUC {_num(cv['mean'])} ± {_num(cv['sd'])}"
        if "test" in model:
            ci = model["test"]["ensemble_ci"]["auc"]
            line += (f"   test AUC (ensemble) {_num(model['test']['ensemble']['auc'])} "
                     f"[{_num(ci[0])}, {_num(ci[1])}]")
        print(line)
    for pair in (report.get("comparisons") or {}).get("pairs", []):
        if "difference" in pair:
            low, high = pair["ci"]
            print(f"{pair['a']} - {pair['b']}: AUC difference {_num(pair['difference'])} "
                  f"[{_num(low)}, {_num(high)}], DeLong p {_num(pair['p_delong'])}, McNemar p "
                  f"{_num(pair['mcnemar']['p_value'])}")
    print(f"report: {cfg.out_dir}/report.md, {cfg.out_dir}/report.json")
    return 0


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _add_outside_root(p) -> None:
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let a labels CSV list images outside its own folder (../, absolute "
                   "paths); without it such a line is an error")


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="k-fold cross-validation + held-out test set of "
                       "USF-MAE and baselines: metrics with CIs, figures, report",
                       description="Fine-tune (or linear-probe) every model of --models "
                       "through the same stratified, patient-grouped splits and seeds; see "
                       "usfmae_fast/finetune/protocol.py. Models: usfmae (from --init), "
                       "vit_scratch (same ViT, random init), any timm name (densenet169, "
                       "resnet50, vit_base_patch16_224; --weights for local pretrained "
                       "weights), each optionally with the suffix _linprobe. " + CONFIG_ORDER)
    p.add_argument("--labels", required=True, help="labels CSV (path,label[,patient_id]) or a "
                   "folder per class")
    add_config_args(p, "ProtocolConfig (train: a mapping of TrainConfig)", "train.epochs=3")
    p.add_argument("--out", help=help_for(ProtocolConfig, "out_dir", "output folder"))
    p.add_argument("--models", help=help_for(ProtocolConfig, "models",
                                             "comma-separated model names"))
    p.add_argument("--init", help="pretrained MAE checkpoint: ours (.safetensors / training "
                   "checkpoint), fb/mae .pth, USF-MAE .pt, timm ViT export, or a Hugging "
                   "Face ViTMAE / ViT folder")
    p.add_argument("--weights", action="append", metavar="NAME=PATH",
                   help="local weights file of a timm baseline (repeatable); nothing downloads")
    p.add_argument("--classes", help="comma-separated class order (default: sorted labels; "
                   "binary: the second is the positive class)")
    p.add_argument("--positive", metavar="CLASS", help="binary tasks: the positive class "
                   "(sensitivity, precision, threshold); needed unless the names say it "
                   "(normal/abnormal, benign/malignant, no/yes, 0/1) or --classes orders them")
    p.add_argument("--selection", choices=SELECTIONS, help=help_for(
        ProtocolConfig, "selection", "epoch choice per fold: inner (early stopping on an inner "
        "split of the training patients) or fixed (train.epochs, keep the last)"))
    p.add_argument("--inner-size", type=float, help=help_for(
        ProtocolConfig, "inner_size", "fraction of a fold's training patients that chooses "
        "the epoch"))
    p.add_argument("--lr-grid", metavar="LR,LR,...", help="peak learning rates tried in every "
                   "fold; each fold keeps the best on its inner split (needs --selection inner)")
    p.add_argument("--threshold", choices=THRESHOLD_RULES, help=help_for(
        ProtocolConfig, "threshold", "binary operating point chosen out of fold: youden or "
        "sensitivity (with --target-sensitivity)"))
    p.add_argument("--target-sensitivity", type=float, help="with --threshold sensitivity: "
                   "the sensitivity the threshold must reach, in (0, 1]")
    p.add_argument("--temperature", action="store_true", help="temperature scaling fitted on "
                   "the out-of-fold predictions (calibration; AUC is unchanged)")
    p.add_argument("--test-labels", help="an independent labelled test set instead of "
                   "holding out --test-size of --labels")
    p.add_argument("--folds", type=int, help=help_for(ProtocolConfig, "folds",
                                                      "cross-validation folds"))
    p.add_argument("--test-size", type=float, help=help_for(
        ProtocolConfig, "test_size", "held-out test fraction, 0 = none"))
    p.add_argument("--seed", type=int, help=help_for(
        ProtocolConfig, "seed", "splits and fold k's training use seed + k"))
    p.add_argument("--n-boot", type=int, help=help_for(ProtocolConfig, "n_boot",
                                                       "bootstrap resamples"))
    p.add_argument("--check", choices=CHECKS,
                   help=help_for(ProtocolConfig, "check", "image check before training"))
    _add_outside_root(p)
    p.add_argument("--title", help=help_for(ProtocolConfig, "title", "report title"))
    for name, (kind, text) in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind,
                       help=text if name in TRAIN_FLAGS_OWN_DEFAULT else
                       help_for(TrainConfig, name, text))
    for name, choices in TRAIN_CHOICES.items():
        p.add_argument("--" + name.replace("_", "-"), choices=choices,
                       help=help_for(TrainConfig, name))
    p.add_argument("--quick", action="store_true", help="a small smoke-test run: 32 px, 2 "
                   "folds, 3 epochs (--config, flags and --set still override)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_finetune)


def evaluate_config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The validated :class:`EvaluateConfig` of ``evaluate``'s arguments: defaults <-
    ``--config`` <- the flags given <- ``--set``."""
    from ..runtime.config import build
    flags = {"ckpt": args.ckpt, "labels": args.labels, "out_dir": args.out, "name": args.name,
             "title": args.title, "n_boot": args.n_boot, "seed": args.seed, "check": args.check,
             "allow_outside_root": args.allow_outside_root or None,
             "batch_size": args.batch_size, "device": args.device, "backend": args.backend,
             "workers": args.workers, "rules": args.rules}
    return build(EvaluateConfig(), args.config,
                 {k: v for k, v in flags.items() if v is not None}, args.set or [])


def _add_evaluate(sub) -> None:
    def run(args: argparse.Namespace) -> int:
        from ..finetune.protocol import evaluate_checkpoints, read_rules
        with exit_on():
            cfg = evaluate_config_from_args(args)
            report = evaluate_checkpoints(cfg.ckpt, cfg.labels, cfg.out_dir, name=cfg.name,
                                          n_boot=cfg.n_boot, seed=cfg.seed, check=cfg.check,
                                          title=cfg.title, train=cfg.train_config(),
                                          allow_outside_root=cfg.allow_outside_root,
                                          rules=read_rules(cfg.rules) if cfg.rules else None)
        ensemble = report["models"][cfg.name]["test"]["ensemble"]
        print(json.dumps({k: ensemble[k] for k in ("auc", "f1", "accuracy", "precision",
                                                    "recall", "specificity", "n")}, indent=2))
        print(f"report: {cfg.out_dir}/report.md, {cfg.out_dir}/report.json")
        return 0

    def default(name: str, text: str = "") -> str:
        return help_for(EvaluateConfig, name, text)

    p = sub.add_parser("evaluate", help="classifier checkpoint(s) + a labelled set -> metrics "
                       "with CIs, ROC / confusion figures, report",
                       description="Several checkpoints (e.g. the fold models) are scored one "
                       "by one and as an ensemble (mean probability). " + CONFIG_ORDER)
    p.add_argument("--ckpt", required=True, nargs="+", help="classifier checkpoint(s)")
    p.add_argument("--labels", required=True, help="labels CSV or a folder per class")
    add_config_args(p, "EvaluateConfig", "n_boot=200")
    p.add_argument("--out", help=default("out_dir", "output folder"))
    p.add_argument("--name", help=default("name", "model name in the report"))
    p.add_argument("--title", help=default("title"))
    p.add_argument("--n-boot", type=int, help=default("n_boot", "bootstrap resamples"))
    p.add_argument("--rules", help="operating_rules.json of a fine-tuning run (its threshold "
                   "and temperature); default: the most probable class")
    p.add_argument("--seed", type=int, help=default("seed", "bootstrap seed"))
    p.add_argument("--check", choices=CHECKS, help=default("check"))
    _add_outside_root(p)
    p.add_argument("--batch-size", type=int, help=default("batch_size"))
    p.add_argument("--device", help=default("device"))
    p.add_argument("--backend", choices=LOADER_BACKENDS, help=default("backend"))
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=run)


def _add_predict(sub) -> None:
    def run(args: argparse.Namespace) -> int:
        from ..finetune.inference import predict_images
        with exit_on():
            summary = predict_images(args.ckpt, args.images, args.out,
                                     batch_size=args.batch_size, device=args.device,
                                     precision=args.precision)
        print(json.dumps(summary, indent=2))
        return 0

    p = sub.add_parser("predict", help="images / DICOMs -> CSV of class probabilities")
    p.add_argument("--ckpt", required=True, nargs="+", help="classifier checkpoint(s); "
                   "several: mean probability")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image or DICOM files, folders, or a CSV with a path column")
    p.add_argument("--out", default="predictions.csv", help="CSV written (default: "
                   "%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--device", default="auto", help="default: %(default)s")
    p.add_argument("--precision", choices=FINETUNE_PRECISIONS, default="auto",
                   help="default: %(default)s")
    p.set_defaults(func=run)


def _add_embed(sub) -> None:
    def run(args: argparse.Namespace) -> int:
        from ..finetune.inference import embed_images
        with exit_on():
            summary = embed_images(args.ckpt, args.images, args.out, img_size=args.img_size,
                                   in_chans=args.in_chans, global_pool=args.global_pool,
                                   batch_size=args.batch_size, device=args.device,
                                   precision=args.precision)
        print(json.dumps(summary, indent=2))
        return 0

    p = sub.add_parser("embed", help="pooled encoder features of images / DICOMs -> "
                       "features.npy + index.csv")
    p.add_argument("--ckpt", required=True, help="a pretraining (MAE) checkpoint or a "
                   "fine-tuned classifier")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image or DICOM files, folders, or a CSV with a path column")
    p.add_argument("--out", default="outputs/embed", help="output folder (default: "
                   "%(default)s)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size of an MAE checkpoint (default: its own)")
    p.add_argument("--in-chans", type=int, choices=[1, 3], default=1)
    p.add_argument("--global-pool", choices=["avg", "token"], default="avg")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--device", default="auto", help="default: %(default)s")
    p.add_argument("--precision", choices=FINETUNE_PRECISIONS, default="auto",
                   help="default: %(default)s")
    p.set_defaults(func=run)


def add_commands(sub) -> None:
    """Register ``finetune``, ``evaluate``, ``predict`` and ``embed``."""
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_embed(sub)
