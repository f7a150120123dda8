"""The clinical papers' protocol for one or more models through the same splits and seeds.

1. Read the labels (``read_labels``) and hold out the test set first (``holdout_split``,
   stratified and patient-grouped; or an independent labelled set, ``test_labels``): it is
   never seen in training or model selection.
2. Stratified, patient-grouped k-fold cross-validation on the rest (``kfold_splits``).
3. For every model and fold ``k`` (seed ``seed + k``, the same for every model): train
   (:func:`~.engine.train_fold`) choosing the epoch on an inner split of the fold's training
   patients (``selection="inner"``) or after a fixed number of epochs (``"fixed"``), so the
   fold's validation set selects nothing; score that model on the validation fold
   (cross-validation metrics, unbiased) and on the test set.
4. Operating point and calibration (:mod:`.assessment`): threshold (binary) and optional
   temperature fitted on the pooled out-of-fold predictions, applied unchanged to the test set.
5. Test set: every fold model's metrics, mean ± sd over folds, and the ensemble (mean of the
   fold models' probabilities) with bootstrap 95 % confidence intervals (patients resampled
   when ids exist); ROC, confusion and reliability figures of the ensemble (of the pooled
   out-of-fold predictions when there is no test set); every pair of models compared on the
   same images (:mod:`.comparisons`: AUC difference with a paired clustered-bootstrap interval,
   DeLong, McNemar).
6. ``report.json`` + ``report.md`` (``report.write_report``) with the run's provenance,
   ``splits.csv`` (every image's set, fold and inner-split folds), per model
   ``<name>/fold<k>/{best.safetensors, history.csv, val_predictions.csv,
   select_predictions.csv}`` and ``<name>/test_predictions.csv``.

Everything that can be checked is checked before the first epoch (labels, classes, splits,
model names, checkpoint files, hyper-parameters), with errors naming the argument.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..models.checkpoint import checkpoint_file
from ..models.classifier import load_finetuned
from ..runtime.files import atomic_write
from ..runtime.lock import output_lock
from ..runtime.provenance import provenance
from .assessment import Rules, assess, fit_rules
from .comparisons import compare_models
from .config import ProtocolConfig
from .engine import (Preprocess, TrainConfig, predict_probs, resolve_device, short_names,
                     train_fold, write_predictions, write_rows)
from .labels import LabelledSet, positive_class, read_labels, with_positive_last
from .metrics import bootstrap_ci, classification_metrics, summarize
from .models import ModelSpec, build_classifier, model_spec
from .report import fmt, plot_confusion, plot_roc, write_report
from .splits import Fold, SplitError, holdout_split, kfold_splits


def quick_config(labels, out_dir, **overrides) -> ProtocolConfig:
    """A small, fast run for smoke tests and demos: 32 px, 2 folds, 3 fixed epochs; keyword
    arguments override protocol fields, ``train=dict(...)`` train fields."""
    train = TrainConfig(**{
        "epochs": 3, "batch_size": 8, "img_size": 32, "warmup_epochs": 1, "patience": None,
        "blr": 0.02, "probe_blr": 0.5, "drop_path": 0.0, "progress": False, "threads": 1,
        "workers": 1, **overrides.pop("train", {})})
    return ProtocolConfig(**{"labels": str(labels), "out_dir": str(out_dir), "folds": 2,
                             "test_size": 0.25, "n_boot": 200, "selection": "fixed",
                             "train": train, **overrides})


@dataclass
class Plan:
    dev: LabelledSet                        # what cross-validation splits
    test: LabelledSet | None
    folds: list[Fold]                       # (train, validation) indices into dev
    inner: list[Fold] | None                # per fold: (fit, select) indices into dev
    specs: list[ModelSpec]
    positive: str | None                    # binary: the positive class (dev.classes[1])


def prepare(cfg: ProtocolConfig) -> Plan:
    """Read and split the data and resolve the models; every input error is raised here,
    before any training."""
    cfg.validate()
    specs = [model_spec(name, cfg.init, cfg.weights) for name in cfg.models]
    if unused := sorted(set(cfg.weights) - {s.arch for s in specs} - set(cfg.models)):
        raise ValueError(f"weights: {unused} name no model of --models {cfg.models}")
    data, test = split_test_set(cfg)
    folds = kfold_splits(data.labels, data.groups, cfg.folds, cfg.seed, data.classes)
    inner = inner_splits(data, folds, cfg) if cfg.selection == "inner" else None
    t = cfg.train
    for spec in specs:  # a checkpoint or weights file that does not fit fails now
        build_classifier(spec, len(data.classes), img_size=t.img_size, in_chans=t.in_chans,
                         global_pool=t.global_pool, vit_size=t.vit_size, mean=t.mean, std=t.std)
    return Plan(data, test, folds, inner, specs,
                data.classes[1] if len(data.classes) == 2 else None)


def inner_splits(data: LabelledSet, folds: list[Fold], cfg: ProtocolConfig) -> list[Fold]:
    """Per fold, ``(fit, select)``: ``cfg.inner_size`` of the fold's training patients
    (stratified, grouped) set aside to choose the epoch; indices into ``data``."""
    inner = []
    for k, (train, _) in enumerate(folds):
        try:
            fit, select = holdout_split(data.labels[train], None if data.groups is None
                                        else data.groups[train], cfg.inner_size,
                                        cfg.seed + 1000 + k, data.classes)
        except SplitError as exc:
            raise SplitError(f"selection: fold {k}'s training part cannot spare an inner "
                             f"split of inner_size={cfg.inner_size} ({exc}); use "
                             "selection=fixed (a fixed number of epochs), a larger "
                             "inner_size or fewer folds") from exc
        inner.append((train[fit], train[select]))
    return inner


def split_test_set(cfg: ProtocolConfig) -> tuple[LabelledSet, LabelledSet | None]:
    """``(development set, test set or None)``: ``cfg.test_labels`` read as an independent set,
    else ``cfg.test_size`` held out of ``cfg.labels`` (stratified, grouped by patient)."""
    data = read_labels(cfg.labels, cfg.classes, cfg.check, cfg.allow_outside_root)
    data = with_positive_last(data, positive_class(data.classes, cfg.positive,
                                                   explicit_order=cfg.classes is not None))
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
    selects = {}
    for k, (_, select) in enumerate(plan.inner or []):
        for i in select:
            selects.setdefault(int(i), []).append(str(k))
    table = rows(plan.dev, "dev", fold_of) + (rows(plan.test, "test", {})
                                              if plan.test is not None else [])
    for i, row in enumerate(table[:len(plan.dev)]):
        row["selects_epoch_of_folds"] = " ".join(selects.get(i, []))
    return write_rows(path, table, ("path", "label", "patient_id", "set", "fold",
                                    "selects_epoch_of_folds"))


def _figures(entry: dict, y, probs, metrics: dict, classes, model_dir: Path, out: Path,
             where: str) -> None:
    roc = plot_roc(y, probs, classes, model_dir / "roc.png", f"{model_dir.name}: {where}")
    confusion = plot_confusion(metrics["confusion_matrix"], classes, model_dir / "confusion.png",
                               f"{model_dir.name}: {where}")
    entry["figures"] = {"roc": os.path.relpath(roc, out),
                        "confusion": os.path.relpath(confusion, out)}


def train_fold_grid(spec: ModelSpec, fit: LabelledSet, select: LabelledSet | None,
                    cfg: ProtocolConfig, fold_dir: Path, k: int) -> tuple:
    """One fold's model: :func:`~.engine.train_fold` with ``cfg.train``, or, with
    ``cfg.lr_grid``, one model per peak learning rate (``fold_dir/lr_<value>/``) of which the
    fold keeps the best inner-split AUC (ties: lower inner-split loss), copied to ``fold_dir``.
    Returns ``(result, {lr: inner-split AUC} or None)``."""
    import shutil
    if not cfg.lr_grid:
        return train_fold(spec, fit, select, cfg.train, fold_dir, seed=cfg.seed + k,
                          info={"fold": k}), None
    best, best_key, scores = None, None, {}
    for lr in cfg.lr_grid:
        result = train_fold(spec, fit, select, replace(cfg.train, lr=lr),
                            fold_dir / f"lr_{lr:g}", seed=cfg.seed + k,
                            info={"fold": k, "lr_grid": list(cfg.lr_grid)})
        kept = result.history[result.best_epoch]
        scores[f"{lr:g}"] = kept["select_auc"]
        key = (-1.0 if kept["select_auc"] is None else kept["select_auc"], -kept["select_loss"])
        if best is None or key > best_key:
            best, best_key = result, key
    for name in ("best.safetensors", "history.csv", "select_predictions.csv"):
        shutil.copy2(best.checkpoint.parent / name, fold_dir / name)
    return replace(best, checkpoint=fold_dir / "best.safetensors"), scores


def fit_model_rules(y, probs, classes, cfg: ProtocolConfig, fitted_on: str) -> Rules:
    return fit_rules(y, probs, classes, rule=cfg.threshold,
                     target_sensitivity=cfg.target_sensitivity, temperature=cfg.temperature,
                     fitted_on=fitted_on)


def _assessment(entry: dict, y, probs, groups, classes, rules: Rules, cfg_seed: int,
                n_boot: int, model_dir: Path, out: Path, where: str) -> dict:
    """Operating point + calibration on a set; the reliability figure joins the entry's."""
    result = assess(y, probs, classes, rules, groups=groups, n_boot=n_boot, seed=cfg_seed,
                    figure=model_dir / "reliability.png", title=f"{model_dir.name}: {where}")
    entry.setdefault("figures", {})["reliability"] = os.path.relpath(
        result.pop("reliability_figure"), out)
    return result


def run_folds(spec: ModelSpec, plan: Plan, cfg: ProtocolConfig) -> tuple[dict, dict]:
    """Every fold of one model: its report entry, and the predictions the comparisons need
    (``{"oof": [N_dev, C], "test": [N_test, C] or None, "rules": Rules}``)."""
    out = Path(cfg.out_dir)
    model_dir, classes, dev, test = out / spec.name, plan.dev.classes, plan.dev, plan.test
    cv, test_metrics, test_probs, folds_info = [], [], [], []
    oof = np.zeros((len(dev), len(classes)))
    started = time.perf_counter()
    for k, (train_idx, val_idx) in enumerate(plan.folds):
        fit_idx, select_idx = plan.inner[k] if plan.inner is not None else (train_idx, None)
        fold_dir = model_dir / f"fold{k}"
        result, grid = train_fold_grid(spec, dev.subset(fit_idx),
                                       None if select_idx is None else dev.subset(select_idx),
                                       cfg, fold_dir, k)
        val = dev.subset(val_idx)
        model = result.classifier.model
        oof[val_idx] = predict_probs(model, val.to_image_list(), result.prep, cfg.train)
        write_predictions(fold_dir / "val_predictions.csv", short_names(val), oof[val_idx],
                          classes, val.labels)
        cv.append(classification_metrics(val.labels, oof[val_idx], classes))
        if test is not None:
            probs = predict_probs(model, test.to_image_list(), result.prep, cfg.train)
            test_probs.append(probs)
            test_metrics.append(classification_metrics(test.labels, probs, classes))
        folds_info.append({"fold": k, "seed": cfg.seed + k, "kept_epoch": result.best_epoch,
                           "epochs_run": len(result.history), "trained_images": len(fit_idx),
                           "selection_images": 0 if select_idx is None else len(select_idx),
                           "lr_grid": grid, "peak_lr": result.peak_lr,
                           "seconds": result.seconds,
                           "checkpoint": os.path.relpath(result.checkpoint, out),
                           "notes": result.classifier.notes})
        if cfg.train.progress:
            from tqdm.auto import tqdm
            tqdm.write(f"{spec.name} fold {k}: kept epoch {result.best_epoch} of "
                       f"{len(result.history)}, validation AUC {fmt(cv[-1]['auc'])}, "
                       f"{result.seconds:.0f} s")
        del result, model
    pooled = classification_metrics(dev.labels, oof, classes)
    entry = {"description": spec.describe(),
             "config": {"model": asdict(spec), "train": asdict(cfg.train), "folds": folds_info,
                        "seconds": time.perf_counter() - started},
             "cv": {"folds": cv, "summary": summarize(cv), "pooled": pooled,
                    "pooled_ci": bootstrap_ci(dev.labels, oof, classes, cfg.n_boot, cfg.seed,
                                              groups=dev.groups)}}
    oof_source = f"pooled out-of-fold predictions of {len(plan.folds)} folds"
    rules = fit_model_rules(dev.labels, oof, classes, cfg, oof_source)
    entry["operating_rules"] = os.path.relpath(
        write_rules(rules, model_dir / "operating_rules.json"), out)
    if test is None:
        _figures(entry, dev.labels, oof, pooled, classes, model_dir, out, oof_source)
        # no independent set: calibration is reported on the data it was fitted on
        entry["cv"]["assessment"] = _assessment(entry, dev.labels, oof, dev.groups, classes,
                                                rules, cfg.seed, cfg.n_boot, model_dir, out,
                                                oof_source)
        return entry, {"oof": oof, "test": None, "rules": rules}
    ensemble = np.mean(test_probs, axis=0)
    metrics = classification_metrics(test.labels, ensemble, classes)
    extra = {f"fold{k}_prob_{c}": [f"{p:.6f}" for p in probs[:, j]]
             for k, probs in enumerate(test_probs) for j, c in enumerate(classes)}
    write_predictions(model_dir / "test_predictions.csv", short_names(test), ensemble, classes,
                      test.labels, extra)
    where = f"test set, ensemble of {len(plan.folds)} folds"
    entry["test"] = {"folds": test_metrics, "summary": summarize(test_metrics),
                     "ensemble": metrics,
                     "ensemble_ci": bootstrap_ci(test.labels, ensemble, classes, cfg.n_boot,
                                                 cfg.seed, groups=test.groups)}
    _figures(entry, test.labels, ensemble, metrics, classes, model_dir, out, where)
    entry["test"]["assessment"] = _assessment(entry, test.labels, ensemble, test.groups,
                                              classes, rules, cfg.seed, cfg.n_boot, model_dir,
                                              out, where)
    return entry, {"oof": oof, "test": ensemble, "rules": rules}


def write_rules(rules: Rules, path) -> Path:
    """``operating_rules.json``: what ``usfmae-fast evaluate --rules`` applies to new data."""
    import json
    text = json.dumps(rules.to_dict(), indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _comparisons(plan: Plan, predictions: dict[str, dict], cfg: ProtocolConfig) -> dict | None:
    """Every pair of models on the test set (on the pooled out-of-fold predictions when there
    is none); None for a single model."""
    if len(predictions) < 2:
        return None
    key, data, on = (("test", plan.test, "the test set, fold-model ensembles")
                     if plan.test is not None else
                     ("oof", plan.dev, "pooled out-of-fold predictions"))
    probs = {name: p[key] for name, p in predictions.items()}
    predicted = {name: p["rules"].predict(p[key]) for name, p in predictions.items()}
    return compare_models(data.labels, probs, predicted, groups=data.groups,
                          n_boot=max(cfg.n_boot, 2000), seed=cfg.seed, on=on)


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
    splits = write_splits(plan, out / "splits.csv")
    models, predictions = {}, {}
    for spec in plan.specs:
        models[spec.name], predictions[spec.name] = run_folds(spec, plan, cfg)
    selection = (f"early stopping on an inner split ({cfg.inner_size} of each fold's training "
                 "patients, column `selects_epoch_of_folds` of `splits.csv`)"
                 if cfg.selection == "inner" else
                 f"none: every fold trains `train.epochs` = `{cfg.train.epochs}` epochs and "
                 "keeps the last")
    held_out = (f"the independent set `{cfg.test_labels}`" if cfg.test_labels else
                "stratified, grouped by patient" if cfg.test_size else "none")
    report = {
        "title": cfg.title,
        "task": {**_task(plan.dev, plan.test, len(plan.folds), cfg.seed, cfg.labels),
                 "positive": plan.positive, "selection": cfg.selection},
        "models": models,
        "comparisons": _comparisons(plan, predictions, cfg),
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
                           for name, m in models.items()}}},
            {"title": "Model selection",
             "text": (f"Epoch selection: {selection}. The validation folds choose nothing, so "
                      "the cross-validation metrics are not optimistic. Operating point and "
                      "calibration are fitted on the pooled out-of-fold predictions and "
                      "applied unchanged to the test set."),
             "numbers": {"epochs": cfg.train.epochs,
                         "patience": cfg.train.patience if cfg.selection == "inner" else None,
                         "inner_size": cfg.inner_size if cfg.selection == "inner" else None}}],
        "config": cfg.to_dict(),
        "provenance": provenance(
            config=cfg.to_dict(), seed=cfg.seed, device=str(resolve_device(cfg.train.device)),
            files={"labels": cfg.labels if Path(cfg.labels).is_file() else None,
                   "test_labels": cfg.test_labels, "splits": splits,
                   "init": cfg.init and checkpoint_file(cfg.init),
                   **{f"weights:{k}": v for k, v in cfg.weights.items()}}),
    }
    write_report(report, out)
    return report


def default_rules(classes) -> Rules:
    """No fitted rules: the most probable class (binary: threshold 0.5), no temperature."""
    binary = len(classes) == 2
    return Rules(0.5 if binary else None, "fixed" if binary else None, None, None,
                 "not fitted: the most probable class", 0)


def read_rules(path) -> Rules:
    """The operating rules a fine-tuning run wrote (``<out>/<model>/operating_rules.json``)."""
    import json
    try:
        values = json.loads(Path(path).read_text())
        return Rules(**values)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"rules: {str(path)!r} is not an operating_rules.json a fine-tuning "
                         f"run wrote ({exc})") from exc


def evaluate_checkpoints(ckpts, labels, out_dir, *, name: str = "model", n_boot: int = 1000,
                         seed: int = 0, check: str = "header", title: str = "Evaluation report",
                         train: TrainConfig | None = None, allow_outside_root: bool = False,
                         rules: Rules | None = None) -> dict:
    """Score classifier checkpoint(s) (an ensemble when several: mean probability) on a
    labelled set: metrics, bootstrap intervals (patients resampled when the labels have ids),
    operating point and calibration under ``rules`` (a fine-tuning run's
    ``operating_rules.json``, see :func:`read_rules`; default: the most probable class), ROC /
    confusion / reliability figures, predictions CSV and ``report.json`` / ``report.md`` with
    provenance under ``out_dir``. ``allow_outside_root``: the labels CSV may list images
    outside its folder."""
    cfg = replace(train or TrainConfig(progress=False), progress=False).validate()
    if not ckpts:
        raise ValueError("ckpt: give at least one checkpoint")
    loaded = [load_finetuned(c) for c in ckpts]
    classes = loaded[0].classes
    for path, model in zip(ckpts, loaded):
        if model.classes != classes:
            raise ValueError(f"ckpt: {str(path)!r} has classes {model.classes}, "
                             f"{str(ckpts[0])!r} has {classes}")
    rules = rules or default_rules(classes)
    if (rules.threshold is not None) != (len(classes) == 2):
        raise ValueError(f"rules: a threshold is for binary tasks; the checkpoints have "
                         f"classes {classes}")
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
                      "ensemble_ci": bootstrap_ci(data.labels, ensemble, classes, n_boot, seed,
                                                  groups=data.groups)}}
    _figures(entry, data.labels, ensemble, metrics, classes, out / name, out, "evaluation set")
    entry["test"]["assessment"] = _assessment(entry, data.labels, ensemble, data.groups,
                                              classes, rules, seed, n_boot, out / name, out,
                                              "evaluation set")
    task = _task(data, None, 0, seed, labels)
    report = {"title": title,
              "task": {**task, "folds": None, "test_size": None,
                       "positive": classes[1] if len(classes) == 2 else None},
              "models": {name: entry},
              "provenance": provenance(
                  config={"checkpoints": [str(c) for c in ckpts], "labels": str(labels),
                          "n_boot": n_boot, "seed": seed, "rules": rules.to_dict(),
                          "train": asdict(cfg)},
                  seed=seed, device=str(device),
                  files={"labels": labels if Path(labels).is_file() else None,
                         **{f"checkpoint{i}": c for i, c in enumerate(ckpts)}})}
    write_report(report, out)
    return report
