"""Label efficiency with frozen features: does MAE pretraining on unlabelled ultrasound help?

Three feature sets of the same images (:data:`ARMS`): the pretrained MAE encoder's pooled
features (``"mae"``, as ``embed`` computes them), the same ViT with the same init scheme at a
seeded random initialisation (``"random_init"``: only pretraining differs) and the preprocessed
image averaged down to a small square (``"pixels"``). A logistic regression on each is trained
on class-stratified, subject-grouped subsets of the development subjects (10 / 25 / 50 / 100 %,
several seeds; the same subset for every arm) and scored by test AUC; paired differences
between arms come with intervals, a curve and generated sentences
(:func:`~.claims.difference_sentence`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .claims import difference_sentence
from .metrics import fold_mean_ci, resampling_units, roc_auc

ARMS = ("mae", "random_init", "pixels")
ARM_LABELS = {"mae": "MAE features", "random_init": "random-init features",
              "pixels": "raw pixels"}
FRACTIONS = (0.1, 0.25, 0.5, 1.0)


# ----------------------------------------------------------------------------- features
class PixelFeatures(nn.Module):
    """The ``"pixels"`` arm as an encoder: the preprocessed image averaged down to
    ``side`` x ``side``, flattened (the interface ``inference.run_on_frames`` calls)."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, self.side).flatten(1)


def reinitialised(model: nn.Module, ckpt, seed: int, mean, std) -> nn.Module:
    """``model`` (loaded from the MAE-family ``ckpt``) with the encoder weights of a fresh
    ``MaskedAutoencoderViT`` of ``ckpt``'s config, built under ``torch.manual_seed(seed)``:
    the pretraining run's model before its first step (the caller's RNG is left untouched)."""
    from ..models import MaskedAutoencoderViT
    from .models import load_vit_encoder, read_vit_encoder

    _, config = read_vit_encoder(ckpt)
    config = {**config, "in_chans": model.patch_embed.proj.in_channels}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = MaskedAutoencoderViT(**config)
    load_vit_encoder(model, fresh.state_dict(), fresh.config, mean, std, str(ckpt))
    return model


def image_paths(images) -> list[str]:
    """The files of a ``LabelledSet`` or an ``ImageList`` (shard members are not supported)."""
    if hasattr(images, "paths"):
        return list(images.paths)
    if in_shard := [r.name for r in images.records if r.in_shard]:
        raise ValueError(f"images: {len(in_shard)} tar-shard member(s), e.g. {in_shard[:3]}; "
                         "give image files")
    return [r.path for r in images.records]


def extract_features(ckpt_or_model, images, *, arm: str = "mae", seed: int = 0,
                     img_size: int | None = None, in_chans: int = 1, mean=None, std=None,
                     pixel_side: int = 16, batch_size: int = 32, device: str = "auto",
                     precision: str = "fp32") -> np.ndarray:
    """Features [N, D] (float32) of ``images`` (a ``LabelledSet`` or an ``ImageList``, in their
    order) for one ``arm`` of :data:`ARMS`, prepared as ``embed`` prepares them (the eval
    transform: short side to ``img_size``, centre crop, normalised with ``mean`` / ``std``).

    ``ckpt_or_model``: an MAE-family checkpoint (``embed``'s ``load_encoder``: the pooled
    encoder, its size and normalisation unless ``img_size`` / ``mean`` / ``std`` are given), or
    a built timm encoder (``forward_features`` / ``forward_head``; size and normalisation from
    its ``pretrained_cfg`` unless given). ``"mae"``: its features; ``"random_init"``: the
    checkpoint's architecture re-initialised by :func:`reinitialised` with ``seed``;
    ``"pixels"``: the same preprocessed images averaged down to ``pixel_side`` squared values.
    """
    from .engine import resolve_device
    from .inference import Input, load_encoder, run_on_frames

    if arm not in ARMS:
        raise ValueError(f"arm: expected one of {ARMS}, got {arm!r}")
    if isinstance(ckpt_or_model, nn.Module):
        if arm == "random_init":
            raise ValueError("ckpt_or_model: the random_init arm rebuilds the architecture "
                             "from a checkpoint file; give its path")
        model, cfg = ckpt_or_model, getattr(ckpt_or_model, "pretrained_cfg", {})
        size, own_mean, own_std = (cfg.get("input_size", [None])[-1], cfg.get("mean"),
                                   cfg.get("std"))
    else:
        if not Path(ckpt_or_model).is_file():
            raise FileNotFoundError(f"ckpt_or_model: {str(ckpt_or_model)!r} does not exist")
        model, size, in_chans, own_mean, own_std = load_encoder(ckpt_or_model, img_size=img_size,
                                                                in_chans=in_chans)
    size = img_size or size
    mean, std = (own_mean if mean is None else mean), (own_std if std is None else std)
    if size is None or mean is None or std is None:
        raise ValueError("img_size, mean, std: the model records none; give them")
    if arm == "random_init":
        model = reinitialised(model, ckpt_or_model, seed, mean, std)
    elif arm == "pixels":
        model = PixelFeatures(pixel_side)
    inputs = [Input(Path(p), "image") for p in image_paths(images)]
    if not inputs:
        raise ValueError("images: empty")
    _, feats = run_on_frames(model, inputs, img_size=size, channels=in_chans, mean=mean, std=std,
                             batch_size=batch_size, device=resolve_device(device),
                             precision=precision, features=True)
    return feats.astype(np.float32)


# ----------------------------------------------------------------------------- subsets
def subject_labels(y: np.ndarray, unit_of: np.ndarray, n_classes: int) -> np.ndarray:
    """Each subject's class for stratification: its most frequent label (ties: lowest index)."""
    counts = np.zeros((int(unit_of.max()) + 1, n_classes), dtype=np.int64)
    np.add.at(counts, (unit_of, y), 1)
    return counts.argmax(axis=1)


def label_subsets(y_dev, groups_dev, n_classes: int, fractions: Sequence[float] = FRACTIONS,
                  seeds: int = 5, seed: int = 0) -> list[list[np.ndarray]]:
    """Training subsets of the development images: for each fraction, one sorted index array
    per seed (a single one where the fraction keeps every subject, as every seed would draw
    the same). Each class's subjects (see :func:`subject_labels`; images when ``groups_dev`` is
    None) are shuffled once per seed with ``default_rng([seed, s])`` and a fraction takes the
    first ``max(1, round(fraction * n))`` of each class, so subsets are stratified, grouped
    (a subject's images are all in or all out) and nested (a seed's 10 % lies inside its 25 %)."""
    y = np.asarray(y_dev)
    unit_of = resampling_units(groups_dev, len(y))
    by_class = [np.flatnonzero(subject_labels(y, unit_of, n_classes) == c)
                for c in range(n_classes)]
    orders = []
    for s in range(seeds):
        rng = np.random.default_rng([seed, s])
        orders.append([rng.permutation(units) for units in by_class])
    subsets = []
    for fraction in fractions:
        take = [max(1, int(fraction * len(units) + 0.5)) for units in by_class]
        full = all(k == len(units) for k, units in zip(take, by_class))
        subsets.append([np.flatnonzero(np.isin(unit_of, np.concatenate(
            [order[:k] for order, k in zip(per_class, take)]))) for per_class in
            (orders[:1] if full else orders)])
    return subsets


# ----------------------------------------------------------------------------- the experiment
def _checked_labels(y, groups, n_classes: int, names: tuple[str, str]) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not len(y) or not np.issubdtype(y.dtype, np.integer) \
            or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{names[0]}: expected a non-empty 1-D array of class indices in "
                         f"[0, {n_classes}), got {y.dtype} of shape {y.shape}")
    if groups is not None and np.shape(groups) != y.shape:
        raise ValueError(f"{names[1]}: expected one subject id per image ({len(y)}), got shape "
                         f"{np.shape(groups)}")
    return y.astype(np.int64)


def _split_features(features: dict, n_dev: int, n_test: int) -> dict:
    if not features:
        raise ValueError("features: give at least one arm")
    split = {}
    for arm, value in features.items():
        if isinstance(value, (tuple, list)) and len(value) == 2:
            dev, test = (np.asarray(v, dtype=np.float64) for v in value)
        else:
            value = np.asarray(value, dtype=np.float64)
            dev, test = value[:n_dev], value[n_dev:]
        if dev.shape[:1] != (n_dev,) or test.shape[:1] != (n_test,) or dev.ndim != 2 \
                or test.ndim != 2 or dev.shape[1] != test.shape[1]:
            raise ValueError(f"features[{arm!r}]: expected [{n_dev} + {n_test}, D] rows (dev "
                             f"first) or a (dev [{n_dev}, D], test [{n_test}, D]) pair, got "
                             f"{dev.shape} and {test.shape}")
        if not (np.all(np.isfinite(dev)) and np.all(np.isfinite(test))):
            raise ValueError(f"features[{arm!r}]: contains NaN or infinite values")
        split[arm] = (dev, test)
    return split


def _fit_predict(x_train, y_train, x_test, C: float, max_iter: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    return model.fit(x_train, y_train).predict_proba(x_test)


def measure_label_efficiency(features: dict, y_dev, groups_dev, y_test, groups_test,
                     classes: Sequence[str], *, fractions: Sequence[float] = FRACTIONS,
                     seeds: int = 5, n_boot: int = 1000, seed: int = 0, C: float = 1.0,
                     max_iter: int = 5000, level: float = 0.95,
                     comparisons: Sequence[tuple[str, str]] | None = None) -> dict:
    """Test AUC of a logistic regression on each arm's ``features`` ({arm: [N_dev + N_test, D]
    with the development rows first, or a (dev, test) pair}) trained on :func:`label_subsets`
    of the development set, and the paired differences of ``comparisons`` (default: ``mae``
    against ``random_init`` and ``pixels``, where given). JSON-ready; ``"method"`` says how.

    Returns ``method, arms, classes, fractions, seeds, seed, C, level, nested, n_dev_images,
    n_dev_subjects, n_test_images, n_test_subjects``; ``training`` [per fraction: fraction,
    n_subjects, n_subjects_per_class, n_images (per fit), n_fits]; ``results`` {arm: [per
    fraction: fraction, auc (per fit), mean, sd, ci, n_fits]}; ``differences`` [per comparison
    and fraction: a, b, fraction, differences (per seed), mean, sd, ci, interval, and where the
    fraction keeps every subject p_value_delong, n_test_subjects, n_boot_valid]; ``sentences``.
    """
    from .stats import compare_auc

    classes = [str(c) for c in classes]
    k = len(classes)
    if k < 2:
        raise ValueError(f"classes: expected at least 2, got {classes}")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions) \
            or len(set(fractions)) != len(fractions):
        raise ValueError(f"fractions: expected distinct values in (0, 1], got {fractions}")
    for name, value, low in (("seeds", seeds, 1), ("n_boot", n_boot, 1), ("max_iter", max_iter, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if not C > 0:
        raise ValueError(f"C: expected a positive inverse regularisation strength, got {C!r}")
    y_dev = _checked_labels(y_dev, groups_dev, k, ("y_dev", "groups_dev"))
    y_test = _checked_labels(y_test, groups_test, k, ("y_test", "groups_test"))
    dev_units = resampling_units(groups_dev, len(y_dev))
    n_subjects = int(dev_units.max()) + 1
    per_class = np.bincount(subject_labels(y_dev, dev_units, k), minlength=k)
    if n_subjects < k or per_class.min() == 0:
        raise ValueError(f"groups_dev: every class needs a development subject of its own (the "
                         f"most frequent label of its images); {n_subjects} subjects for {k} "
                         f"classes, per class {dict(zip(classes, per_class.tolist()))}")
    if (test_counts := np.bincount(y_test, minlength=k)).min() < 2:
        raise ValueError(f"y_test: every class needs at least 2 test images for an AUC and "
                         f"DeLong, got {dict(zip(classes, test_counts.tolist()))}")
    if groups_dev is not None and groups_test is not None and \
            (shared := np.intersect1d(np.asarray(groups_dev), np.asarray(groups_test))).size:
        raise ValueError(f"groups_test: subjects {shared[:5].tolist()} are in the development "
                         "set too")
    data = _split_features(features, len(y_dev), len(y_test))
    arms = list(data)
    if comparisons is None:
        comparisons = [("mae", b) for b in ("random_init", "pixels") if "mae" in data and b in data]
    for a, b in comparisons:
        if a not in data or b not in data:
            raise ValueError(f"comparisons: ({a!r}, {b!r}) names an arm not in features {arms}")

    subsets = label_subsets(y_dev, groups_dev, k, fractions, int(seeds), seed)
    probs = {arm: [[_fit_predict(dev[idx], y_dev[idx], test, C, max_iter) for idx in fits]
                   for fits in subsets] for arm, (dev, test) in data.items()}
    results = {arm: [] for arm in arms}
    for arm in arms:
        for fraction, per_fit in zip(fractions, probs[arm]):
            aucs = [roc_auc(y_test, p, "macro") for p in per_fit]
            results[arm].append({
                "fraction": fraction, "auc": aucs, "mean": float(np.mean(aucs)),
                "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
                "ci": (fold_mean_ci(aucs, level, bounds=(0.0, 1.0)) if len(aucs) > 1
                       else [aucs[0], aucs[0]]),
                "n_fits": len(aucs)})
    test_units = resampling_units(groups_test, len(y_test))
    differences, sentences = [], []
    for a, b in comparisons:
        for i, fraction in enumerate(fractions):
            diffs = [x - y for x, y in zip(results[a][i]["auc"], results[b][i]["auc"])]
            row = {"a": a, "b": b, "fraction": fraction, "differences": diffs,
                   "mean": float(np.mean(diffs)),
                   "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0}
            if len(diffs) > 1:
                row.update(ci=fold_mean_ci(diffs, level, bounds=(-1.0, 1.0)),
                           interval=f"t-interval over {len(diffs)} seeds (subset-to-subset "
                                    "spread; the test set held fixed)")
            else:
                cmp = compare_auc(y_test, probs[a][i][0], probs[b][i][0], groups_test,
                                  n_boot=int(n_boot), level=level, seed=seed)
                row.update(ci=list(cmp.ci), p_value_delong=cmp.p_value,
                           n_test_subjects=cmp.n_groups, n_boot_valid=cmp.n_boot_valid,
                           interval=f"paired bootstrap over test "
                                    f"{'subjects' if groups_test is not None else 'images'} "
                                    f"({int(n_boot)} resamples; one fit on every development "
                                    "subject, no spread over seeds)")
            # digit-free (report.md keeps numbers in tables): the fraction is the table's row
            row["sentence"] = difference_sentence(a, b, "test AUC", row["ci"])
            differences.append(row)
            sentences.append(row["sentence"])
    training = []
    for fraction, fits in zip(fractions, subsets):
        units = np.unique(dev_units[fits[0]])
        training.append({
            "fraction": fraction, "n_subjects": int(len(units)),
            "n_subjects_per_class": dict(zip(classes, np.bincount(
                subject_labels(y_dev, dev_units, k)[units], minlength=k).tolist())),
            "n_images": [int(len(idx)) for idx in fits], "n_fits": len(fits)})
    unit = "subjects" if groups_dev is not None else "images (no subject ids)"
    method = (
        f"Features per arm ({', '.join(arms)}); a scikit-learn pipeline StandardScaler + "
        f"LogisticRegression(C={C:g}, max_iter={max_iter}, lbfgs; C fixed in advance, the same "
        f"for every arm and fraction, never tuned on the test set) is trained on a subset of the "
        f"{len(y_dev)} development images ({n_subjects} {unit}) and scored on the {len(y_test)} "
        f"test images by ROC AUC ({'binary' if k == 2 else 'macro one-vs-rest'}). Subsets: each "
        f"subject's class is its most frequent label; per seed (default_rng([{seed}, s]), s < "
        f"{seeds}) each class's {unit.split()[0]} are shuffled and a fraction f takes the first "
        f"max(1, round(f n)) of each class, so subsets are stratified, subject-grouped, nested "
        f"across fractions and identical for every arm. A fraction that keeps every subject "
        f"is fitted once (no spread over seeds). Per arm and fraction: mean, sd and a "
        f"{100 * level:g} % t-interval over seeds, which describes subset-to-subset spread "
        f"with the test set fixed, not test-set uncertainty. Differences are paired over the "
        f"same seeds (t-interval); where every subject is used, a paired bootstrap over test "
        f"{'subjects' if groups_test is not None else 'images'} ({n_boot} resamples) and "
        f"DeLong's test (stats.compare_auc).")
    return {"method": method, "arms": arms, "classes": classes, "fractions": fractions,
            "seeds": int(seeds), "seed": int(seed), "C": float(C), "level": float(level),
            "nested": True, "n_dev_images": int(len(y_dev)), "n_dev_subjects": n_subjects,
            "n_test_images": int(len(y_test)), "n_test_subjects": int(test_units.max()) + 1,
            "training": training, "results": results, "differences": differences,
            "sentences": sentences}


# ----------------------------------------------------------------------------- the curve
def plot_label_efficiency(result: dict, path, title: str = "") -> Path:
    """Test AUC against the share of labelled development subjects (log x), one line per arm
    with its t-interval over seeds as a band (which closes where every subject is used: one
    fit); x ticks name the subjects used."""
    from ..runtime.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [100 * f for f in result["fractions"]]
    for arm in result["arms"]:
        rows = result["results"][arm]
        (line,) = ax.plot(x, [r["mean"] for r in rows], marker="o",
                          label=ARM_LABELS.get(arm, arm))
        ax.fill_between(x, [r["ci"][0] for r in rows], [r["ci"][1] for r in rows],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{p:g} %\n{t['n_subjects']} subj." for p, t in
                      zip(x, result["training"])])
    ax.minorticks_off()
    ax.set_xlabel("labelled development subjects used")
    ax.set_ylabel("test AUC" + (" (macro one-vs-rest)" if len(result["classes"]) > 2 else ""))
    ax.grid(alpha=0.3)
    ax.legend(title=f"mean of {result['seeds']} seeds; band: {100 * result['level']:g} % "
                    "t-interval over seeds\n(none where every subject is used: one fit)",
              fontsize="small", title_fontsize="small")
    ax.set_title(title or "Label efficiency with frozen features")
    return save_figure(fig, path)
