"""The clinical papers' protocol for one or more models through the same splits and seeds.

1. Read the labels (``read_labels``) and hold out the test set first (``holdout_split``,
   stratified and patient-grouped; or an independent labelled set, ``test_labels``): it is
   never seen in training or model selection.
2. Stratified, patient-grouped k-fold cross-validation on the rest (``kfold_splits``).
3. For every model and fold ``k`` (seed ``seed + k``, the same for every model): train with
   early stopping on the fold's validation AUC (:func:`~.engine.train_fold`), score the best
   epoch on the validation fold (cross-validation metrics) and on the test set.
4. Test set: every fold model's metrics, mean ± sd over folds, and the ensemble (mean of the
   fold models' probabilities) with bootstrap 95 % confidence intervals; ROC and confusion
   figures of the ensemble (of the pooled out-of-fold predictions when there is no test set).
5. ``report.json`` + ``report.md`` (``report.write_report``), ``splits.csv`` (every image's
   set and fold), per model ``<name>/fold<k>/{best.safetensors, history.csv,
   val_predictions.csv}`` and ``<name>/test_predictions.csv``.

Everything that can be checked is checked before the first epoch (labels, classes, splits,
model names, checkpoint files, hyper-parameters), with errors naming the argument.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..runtime.lock import output_lock
from .engine import (Preprocess, TrainConfig, predict_probs, resolve_device, short_names,
                     train_fold, write_predictions, write_rows)
from .config import ProtocolConfig
from .labels import LabelledSet, read_labels
from .metrics import bootstrap_ci, classification_metrics, summarize
from ..models.classifier import load_finetuned
from .models import ModelSpec, build_classifier, model_spec
from .report import fmt, plot_confusion, plot_roc, write_report
from .splits import SplitError, holdout_split, kfold_splits


def quick_config(labels, out_dir, **overrides) -> ProtocolConfig:
    """A small, fast run for smoke tests and demos: 32 px, 2 folds, 3 epochs; keyword
    arguments override protocol fields, ``train=dict(...)`` train fields."""
    train = TrainConfig(**{
        "epochs": 3, "batch_size": 8, "img_size": 32, "warmup_epochs": 1, "patience": None,
        "blr": 0.02, "probe_blr": 0.5, "drop_path": 0.0, "progress": False, "threads": 1,
        "workers": 1, **overrides.pop("train", {})})
    return ProtocolConfig(**{"labels": str(labels), "out_dir": str(out_dir), "folds": 2,
                             "test_size": 0.25, "n_boot": 200, "train": train, **overrides})


@dataclass
class Plan:
    dev: LabelledSet                        # what cross-validation splits
    test: LabelledSet | None
    folds: list[tuple[np.ndarray, np.ndarray]]
    specs: list[ModelSpec]


def prepare(cfg: ProtocolConfig) -> Plan:
    """Read and split the data and resolve the models; every input error is raised here,
    before any training."""
    cfg.validate()
    specs = [model_spec(name, cfg.init, cfg.weights) for name in cfg.models]
    if unused := sorted(set(cfg.weights) - {s.arch for s in specs} - set(cfg.models)):
        raise ValueError(f"weights: {unused} name no model of --models {cfg.models}")
    data, test = split_test_set(cfg)
    folds = kfold_splits(data.labels, data.groups, cfg.folds, cfg.seed, data.classes)
    t = cfg.train
    for spec in specs:  # a checkpoint or weights file that does not fit fails now
        build_classifier(spec, len(data.classes), img_size=t.img_size, in_chans=t.in_chans,
                         global_pool=t.global_pool, vit_size=t.vit_size, mean=t.mean, std=t.std)
    return Plan(data, test, folds, specs)


def split_test_set(cfg: ProtocolConfig) -> tuple[LabelledSet, LabelledSet | None]:
    """``(development set, test set or None)``: ``cfg.test_labels`` read as an independent set,
    else ``cfg.test_size`` held out of ``cfg.labels`` (stratified, grouped by patient)."""
    data = read_labels(cfg.labels, cfg.classes, cfg.check, cfg.allow_outside_root)
    if cfg.test_labels:
        test = read_labels(cfg.test_labels, data.classes, cfg.check, cfg.allow_outside_root)
        _check_independent(data, test)
        return data, test
    if cfg.test_size > 0:
        dev_idx, test_idx = holdout_split(data.labels, data.groups, cfg.test_size, cfg.seed,
                                          data.classes)
        return data.subset(dev_idx), data.subset(test_idx)
    return data, None


def _check_independent(dev: LabelledSet, test: LabelledSet) -> None:
    if shared := sorted(set(dev.paths) & set(test.paths)):
        raise SplitError(f"test_labels: {len(shared)} image(s) are also in labels, e.g. "
                         f"{shared[:3]}")
    if dev.groups is not None and test.groups is not None and \
            (shared := sorted(set(dev.groups.tolist()) & set(test.groups.tolist()))):
        raise SplitError(f"test_labels: {len(shared)} patient(s) are also in labels, e.g. "
                         f"{shared[:3]}")


def write_splits(plan: Plan, path) -> Path:
    """Every image's set (dev / test), validation fold and patient: the split, auditable."""
    def rows(data: LabelledSet, name: str, fold_of: dict) -> list[dict]:
        return [{"path": path, "label": data.classes[label], "set": name,
                 "patient_id": "" if data.groups is None else str(data.groups[i]),
                 "fold": fold_of.get(i, "")}
                for i, (path, label) in enumerate(zip(data.paths, data.labels))]

    fold_of = {int(i): k for k, (_, val) in enumerate(plan.folds) for i in val}
    table = rows(plan.dev, "dev", fold_of) + (rows(plan.test, "test", {})
                                              if plan.test is not None else [])
    return write_rows(path, table, ("path", "label", "patient_id", "set", "fold"))


def _figures(entry: dict, y, probs, metrics: dict, classes, model_dir: Path, out: Path,
             where: str) -> None:
    roc = plot_roc(y, probs, classes, model_dir / "roc.png", f"{model_dir.name}: {where}")
    confusion = plot_confusion(metrics["confusion_matrix"], classes, model_dir / "confusion.png",
                               f"{model_dir.name}: {where}")
    entry["figures"] = {"roc": os.path.relpath(roc, out),
                        "confusion": os.path.relpath(confusion, out)}


def run_folds(spec: ModelSpec, plan: Plan, cfg: ProtocolConfig) -> dict:
    """Every fold of one model; its report entry."""
    out = Path(cfg.out_dir)
    model_dir, classes, dev, test = out / spec.name, plan.dev.classes, plan.dev, plan.test
    cv, test_metrics, test_probs, folds_info = [], [], [], []
    oof = np.zeros((len(dev), len(classes)))
    started = time.perf_counter()
    for k, (train_idx, val_idx) in enumerate(plan.folds):
        result = train_fold(spec, dev.subset(train_idx), dev.subset(val_idx), cfg.train,
                            model_dir / f"fold{k}", seed=cfg.seed + k, info={"fold": k})
        oof[val_idx] = result.val_probs
        cv.append(classification_metrics(dev.labels[val_idx], result.val_probs, classes))
        if test is not None:
            probs = predict_probs(result.classifier.model, test.to_image_list(), result.prep,
                                  cfg.train)
            test_probs.append(probs)
            test_metrics.append(classification_metrics(test.labels, probs, classes))
        folds_info.append({"fold": k, "seed": cfg.seed + k, "best_epoch": result.best_epoch,
                           "epochs_run": len(result.history), "seconds": result.seconds,
                           "checkpoint": os.path.relpath(result.checkpoint, out),
                           "notes": result.classifier.notes})
        if cfg.train.progress:
            from tqdm.auto import tqdm
            tqdm.write(f"{spec.name} fold {k}: best epoch {result.best_epoch} of "
                       f"{len(result.history)}, validation AUC {fmt(cv[-1]['auc'])}, "
                       f"{result.seconds:.0f} s")
        del result
    entry = {"description": spec.describe(),
             "config": {"model": asdict(spec), "train": asdict(cfg.train), "folds": folds_info,
                        "seconds": time.perf_counter() - started},
             "cv": {"folds": cv, "summary": summarize(cv)}}
    if test is None:
        metrics = classification_metrics(dev.labels, oof, classes)
        _figures(entry, dev.labels, oof, metrics, classes, model_dir, out,
                 f"out-of-fold predictions of {len(plan.folds)} folds")
        return entry
    ensemble = np.mean(test_probs, axis=0)
    metrics = classification_metrics(test.labels, ensemble, classes)
    extra = {f"fold{k}_prob_{c}": [f"{p:.6f}" for p in probs[:, j]]
             for k, probs in enumerate(test_probs) for j, c in enumerate(classes)}
    write_predictions(model_dir / "test_predictions.csv", short_names(test), ensemble, classes,
                      test.labels, extra)
    entry["test"] = {"folds": test_metrics, "summary": summarize(test_metrics),
                     "ensemble": metrics,
                     "ensemble_ci": bootstrap_ci(test.labels, ensemble, classes, cfg.n_boot,
                                                 cfg.seed)}
    _figures(entry, test.labels, ensemble, metrics, classes, model_dir, out,
             f"test set, ensemble of {len(plan.folds)} folds")
    return entry


def _task(dev: LabelledSet, test: LabelledSet | None, folds: int, seed: int, data: str) -> dict:
    sets = [dev] + ([test] if test is not None else [])
    labels = np.concatenate([s.labels for s in sets])
    groups = [s.groups for s in sets]
    patients = (len(set(np.concatenate(groups).tolist())) if all(g is not None for g in groups)
                else len(labels))
    return {"classes": list(dev.classes), "n_images": len(labels), "n_patients": patients,
            "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(dev.classes)},
            "folds": folds,
            "test_size": round(len(test) / len(labels), 4) if test is not None else 0.0,
            "seed": seed, "data": str(data)}


def run_protocol(cfg: ProtocolConfig, plan: Plan | None = None) -> dict:
    """Cross-validation + test set for every model of ``cfg.models``; writes everything under
    ``cfg.out_dir`` and returns the report (also in ``report.json``). ``plan``: the result of
    :func:`prepare` when the caller has checked the inputs already. The folder is held for the
    run (:class:`~usfmae_fast.runtime.lock.FolderBusy` if another run holds it)."""
    plan = plan or prepare(cfg)
    with output_lock(cfg.out_dir, "finetune"):
        return _run_models(cfg, plan)


def _run_models(cfg: ProtocolConfig, plan: Plan) -> dict:
    out = Path(cfg.out_dir)
    write_splits(plan, out / "splits.csv")
    models = {spec.name: run_folds(spec, plan, cfg) for spec in plan.specs}
    held_out = (f"the independent set `{cfg.test_labels}`" if cfg.test_labels else
                "stratified, grouped by patient" if cfg.test_size else "none")
    report = {
        "title": cfg.title,
        "task": _task(plan.dev, plan.test, len(plan.folds), cfg.seed, cfg.labels),
        "models": models,
        "sections": [{
            "title": "Splits and seeds",
            "text": (f"The test set is held out first ({held_out}); stratified "
                     "cross-validation grouped by patient splits the rest. Every image's set "
                     "and fold are in `splits.csv`. Every model trains fold k with the seed "
                     "`seed + k` (below), the same for every model, so the models differ only "
                     "in their weights and recipe. Seconds: wall time of all folds of a model "
                     f"on `{resolve_device(cfg.train.device)}`."),
            "numbers": {"dev_images": len(plan.dev),
                        "test_images": len(plan.test) if plan.test is not None else 0,
                        **{f"fold{k}_seed": cfg.seed + k for k in range(len(plan.folds))},
                        **{f"{name}_seconds": m["config"]["seconds"]
                           for name, m in models.items()}}}],
        "config": cfg.to_dict(),
    }
    write_report(report, out)
    return report


def evaluate_checkpoints(ckpts, labels, out_dir, *, name: str = "model", n_boot: int = 1000,
                         seed: int = 0, check: str = "header", title: str = "Evaluation report",
                         train: TrainConfig | None = None,
                         allow_outside_root: bool = False) -> dict:
    """Score classifier checkpoint(s) (an ensemble when several: mean probability) on a
    labelled set: metrics, bootstrap intervals, ROC / confusion figures, predictions CSV and
    ``report.json`` / ``report.md`` under ``out_dir``. ``allow_outside_root``: the labels CSV
    may list images outside its folder."""
    cfg = replace(train or TrainConfig(progress=False), progress=False).validate()
    if not ckpts:
        raise ValueError("ckpt: give at least one checkpoint")
    loaded = [load_finetuned(c) for c in ckpts]
    classes = loaded[0].classes
    for path, model in zip(ckpts, loaded):
        if model.classes != classes:
            raise ValueError(f"ckpt: {str(path)!r} has classes {model.classes}, "
                             f"{str(ckpts[0])!r} has {classes}")
    data = read_labels(labels, classes, check, allow_outside_root)
    device = resolve_device(cfg.device)
    out = Path(out_dir)
    probs = [predict_probs(m.model.to(device), data.to_image_list(),
                           Preprocess(m.img_size, m.in_chans, m.mean, m.std), cfg)
             for m in loaded]
    per_model = [classification_metrics(data.labels, p, classes) for p in probs]
    ensemble = np.mean(probs, axis=0)
    metrics = classification_metrics(data.labels, ensemble, classes)
    write_predictions(out / name / "predictions.csv", short_names(data), ensemble, classes,
                      data.labels)
    entry = {"description": f"{len(ckpts)} checkpoint(s)" + (", ensemble: mean probability"
                                                            if len(ckpts) > 1 else ""),
             "config": {"checkpoints": [str(c) for c in ckpts],
                        "inputs": [m.describe() for m in loaded]},
             "test": {"folds": per_model, "summary": summarize(per_model), "ensemble": metrics,
                      "ensemble_ci": bootstrap_ci(data.labels, ensemble, classes, n_boot, seed)}}
    _figures(entry, data.labels, ensemble, metrics, classes, out / name, out, "evaluation set")
    task = _task(data, None, 0, seed, labels)
    report = {"title": title, "task": {**task, "folds": None, "test_size": None},
              "models": {name: entry}}
    write_report(report, out)
    return report
