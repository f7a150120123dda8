"""The main job end to end, on data that installs offline (``make demo`` / ``usfmae-fast demo``),
as an experiment: does MAE pretraining on unlabelled ultrasound help?

1. **ingest** every ultrasound DICOM of ``pydicom-data`` (every frame; exact duplicates dropped);
2. **pretrain** a small ViT-MAE (plain-pixel loss, as USF-MAE) on those real frames plus the
   simulated subjects that carry no label anywhere (``bmode_sim/unlabelled``): no labelled
   subject, development or test, is in the pool (checked). Its held-out loss is compared, on
   the same seeded mask draws, with trivial predictors (zero, the visible pixels' mean, the
   patch-mean oracle);
3. **label efficiency** with frozen features: logistic regression on the MAE encoder's
   features, on the same ViT at random initialisation and on raw pixels, at 10 / 25 / 50 /
   100 % of the development subjects (several seeds, subject-grouped), scored on the test set;
4. **fine-tune** with the clinical protocol on the simulated labelled B-mode set
   (:mod:`usfmae_fast.data.simulate`): held-out test set, patient-grouped cross-validation,
   each fold's epoch and learning rate (``lr_grid``) chosen on an inner split; the
   MAE-initialised ViT against the same ViT from scratch and a ResNet-18 reference, compared
   pairwise on the same test images (patient-clustered interval of the AUC difference, DeLong,
   McNemar);
5. **Score-CAM** of the ground-truth class on the test set's lesion images, with the pointing
   game, energy in the lesion mask, their centre-pointer and uniform-map baselines,
   deletion / insertion scores, and the posterior-shadow hypothesis tested where the
   simulation exports shadow regions;
6. **report**: ``report.md`` + ``report.json``; every sentence comparing two arms is generated
   from the paired result (:mod:`usfmae_fast.finetune.claims`); ``provenance.json`` (also
   ``report.json``'s ``demo_provenance``).

Progress and an ETA are printed between stages (scaled from a measured reference run).
``quick=True`` (``--quick``) runs the same pipeline at a size for CI (a few subjects per
class, 2 folds, a few steps and epochs, 32 px).
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .runtime.lock import output_lock
from .runtime.provenance import provenance

DEMO_SET = Path(__file__).resolve().parent / "demo_data" / "bmode_sim"
LESION_CLASSES = ("cyst", "solid")


def free_cores() -> int:
    """CPU cores not already busy (by the 1-minute load average), at least 1. On a shared
    machine OpenMP threads that wait for a descheduled sibling make 2 threads several times
    slower than 1, so the demo uses only the idle cores unless told otherwise."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cores or 1, (cores or 1) - busy))


@dataclass
class DemoConfig:
    out_dir: str = "outputs/demo"
    labels: str = str(DEMO_SET / "labels.csv")
    masks: str = str(DEMO_SET / "masks")
    # unlabelled simulated subjects for pretraining (never labelled; None or missing: none)
    unlabelled: str | None = str(DEMO_SET / "unlabelled")
    # the ViT from MAE vs the same ViT from scratch, and a small CNN reference (densenet169
    # can be added: --models usfmae,vit_scratch,resnet18,densenet169)
    models: tuple[str, ...] = ("usfmae", "vit_scratch", "resnet18")
    seed: int = 0
    img_size: int = 64
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    finetune_epochs: int = 8
    finetune_batch: int = 16
    finetune_lr: float = 3e-3              # the lr when lr_grid is empty
    # per fold, each arm keeps the inner split's best (so the scratch ViT gets a fair chance)
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    label_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)  # label-efficiency curve
    label_seeds: int = 5
    crop_min: float = 0.5                  # random crops keep at least half the image: lesions stay
    patience: int = 3
    folds: int = 3
    test_size: float = 0.2
    subjects_per_class: int | None = None  # None: every subject of the labelled set
    n_boot: int = 1000
    threads: int | None = None             # None: free_cores()
    progress: bool = True

    def validate(self) -> "DemoConfig":
        """``ValueError`` naming the first field out of range and the range accepted (the
        stages' own configs check the rest before the first stage)."""
        checks = {"pretrain_steps": (self.pretrain_steps >= 1, ">= 1"),
                  "pretrain_batch": (self.pretrain_batch >= 1, ">= 1"),
                  "finetune_epochs": (self.finetune_epochs >= 1, ">= 1"),
                  "folds": (self.folds >= 2, ">= 2"), "seed": (self.seed >= 0, ">= 0"),
                  "subjects_per_class": (self.subjects_per_class is None
                                         or self.subjects_per_class >= 1, ">= 1, or all"),
                  "threads": (self.threads is None or self.threads >= 1, ">= 1"),
                  "models": (len(self.models) > 0, "one or more model names"),
                  "lr_grid": (all(v > 0 for v in self.lr_grid) and (
                      not self.lr_grid or bool(self.patience)),
                      "learning rates > 0; a grid needs patience > 0 (an inner split)")}
        for name, (ok, accepted) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range; accepted: "
                                 f"{accepted}")
        return self

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """The CI size: 6 subjects per class, 2 folds, 20 MAE steps, 2 epochs, 32 px."""
        return replace(cls(img_size=32, pretrain_steps=20, pretrain_batch=16,
                           finetune_epochs=2, finetune_batch=16, patience=0, folds=2,
                           test_size=0.25, subjects_per_class=6, n_boot=200, lr_grid=()),
                       **overrides)


# Seconds of each stage in a reference run on the 2-core CPU machine (commit ddb050f: 300 MAE
# steps of 32 images, 3 models x 3 folds x 8 epochs x 2 learning rates, 4 x 5 label-efficiency
# fits, 64 px; `usfmae-fast demo --out /tmp/dfull2`), and the work each stage did there; the
# ETA printed between stages scales these by the run's own work and this machine's pace.
REFERENCE_SECONDS = {"ingest": 3.0, "pretrain": 59.3, "label_efficiency": 11.2,
                     "finetune": 202.4, "scorecam": 49.6}
REFERENCE_WORK = {"ingest": 1.0, "pretrain": 300 * 32 * 64 ** 2, "label_efficiency": 4 * 5,
                  "finetune": 3 * 3 * 8 * 2 * 64 ** 2, "scorecam": 1.0}


def stage_work(cfg: DemoConfig) -> dict[str, float]:
    """Each stage's work relative to the reference run's (1.0 = the same)."""
    pixels = cfg.img_size ** 2
    work = {"ingest": 1.0, "pretrain": cfg.pretrain_steps * cfg.pretrain_batch * pixels,
            "label_efficiency": len(cfg.label_fractions) * cfg.label_seeds,
            "finetune": (len(cfg.models) * cfg.folds * cfg.finetune_epochs
                         * max(1, len(cfg.lr_grid)) * pixels),
            "scorecam": 1.0}
    return {name: value / REFERENCE_WORK[name] for name, value in work.items()}


def eta_seconds(cfg: DemoConfig, done: dict[str, float]) -> float:
    """Seconds the remaining stages should take: their reference time scaled by their work and
    by this run's pace so far (its seconds over the reference's for the stages done)."""
    work = stage_work(cfg)
    expected_done = sum(REFERENCE_SECONDS[s] * work[s] for s in done)
    pace = sum(done.values()) / expected_done if expected_done > 0 else 1.0
    return pace * sum(REFERENCE_SECONDS[s] * work[s] for s in REFERENCE_SECONDS if s not in done)


def _say(cfg: DemoConfig, text: str) -> None:
    if cfg.progress:
        print(f"demo: {text}", flush=True)


def select_subjects(labels_csv: Path, per_class: int | None, out: Path) -> Path:
    """``labels_csv`` itself, or a copy listing the first ``per_class`` subjects of each class
    (paths made absolute: the copy lies elsewhere; each must lie inside ``labels_csv``'s
    folder, as the fine-tuning protocol requires of the CSV itself)."""
    from .finetune.labels import listed_path

    if per_class is None:
        return labels_csv
    with labels_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = [(reader.line_num, row) for row in reader], reader.fieldnames
    kept: dict[str, list[str]] = {}
    chosen = []
    for line, row in rows:
        subjects = kept.setdefault(row["label"], [])
        if row["patient_id"] not in subjects and len(subjects) < per_class:
            subjects.append(row["patient_id"])
        if row["patient_id"] in subjects:
            chosen.append({**row, "path": listed_path(labels_csv, row["path"], line)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(chosen)
    return out


def ingest_stage(cfg: DemoConfig, out: Path) -> dict:
    from .data.ingest.dicom_frames import ultrasound_test_files
    from .data.ingest import ingest

    files = ultrasound_test_files()
    if not files:
        raise RuntimeError("no ultrasound DICOMs found: is pydicom-data installed?")
    # every frame of every cine: near-duplicate dropping off, exact duplicates still dropped
    return ingest(files, out, workers=cfg.threads, progress=cfg.progress, near_dup_bits=-1)


def unlabelled_images(folder: str | None) -> list[str]:
    """The simulated subjects that have no label anywhere (``bmode_sim/unlabelled``)."""
    from .data.load.image_files import image_records_in

    if not folder or not Path(folder).is_dir():
        return []
    return [r.path for r in image_records_in(Path(folder))]


def pretraining_images(ingest_dir: Path, unlabelled: list[str], labelled: set[str],
                       out: Path) -> tuple[Path, dict]:
    """A ``path`` CSV of the ingested frames + the unlabelled simulated subjects, and their
    pixel mean / std (in [0, 1]) for the normalisation. ``labelled``: every labelled image
    (development and test); none may be in the pool."""
    from PIL import Image

    from .data.load.torch_loader import frame_stats

    with (ingest_dir / "manifest.csv").open(newline="") as f:
        frames = [str((ingest_dir / row["path"]).resolve()) for row in csv.DictReader(f)]
    paths = frames + list(unlabelled)
    if shared := sorted({str(Path(p).resolve()) for p in paths} & labelled):
        raise ValueError(f"unlabelled: {len(shared)} pretraining image(s) are also labelled, "
                         f"e.g. {shared[:3]}")

    def gray(path):
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))

    mean, std = frame_stats([gray(p) for p in paths])
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        writer.writerows([p] for p in paths)
    return out, {"real_frames": len(frames), "simulated_images": len(unlabelled),
                 "mean": mean, "std": std}


def pretrain_stage(cfg: DemoConfig, source: Path, stats: dict, out: Path) -> dict:
    from .pretrain.config import build_config
    from .pretrain.engine import pretrain

    train_cfg = build_config("demo", overrides={
        "model.img_size": cfg.img_size, "model.patch_size": 8 if cfg.img_size >= 64 else 4,
        "data.source": str(source), "data.mean": stats["mean"], "data.std": stats["std"],
        "data.heldout": 16, "model.norm_pix_loss": False,  # plain pixels, as USF-MAE
        "optim.steps": cfg.pretrain_steps, "optim.batch_size": cfg.pretrain_batch,
        "optim.warmup_steps": max(1, cfg.pretrain_steps // 10),
        "system.seed": cfg.seed, "system.num_threads": cfg.threads,
        "output.out_dir": str(out), "output.progress": cfg.progress,
        "output.overwrite": True})  # the demo's folder is disposable: always a fresh run
    return pretrain(train_cfg)


def label_efficiency_stage(cfg: DemoConfig, weights: str, dev, test, out: Path) -> dict:
    """Frozen features of the MAE encoder, of the same architecture at random initialisation
    and of raw pixels; logistic regression on growing shares of the development subjects,
    scored on the test set (:mod:`usfmae_fast.finetune.label_efficiency`); the curve drawn."""
    from .finetune.label_efficiency import (extract_features, measure_label_efficiency,
                                            plot_label_efficiency)

    common = dict(img_size=cfg.img_size, seed=cfg.seed, device="auto")  # as the other stages
    features = {arm: (extract_features(weights, dev, arm=arm, **common),
                      extract_features(weights, test, arm=arm, **common))
                for arm in ("mae", "random_init", "pixels")}
    result = measure_label_efficiency(features, dev.labels, dev.groups, test.labels,
                                      test.groups, dev.classes, fractions=cfg.label_fractions,
                                      seeds=cfg.label_seeds, n_boot=cfg.n_boot, seed=cfg.seed)
    result["figure"] = plot_label_efficiency(result, out / "label_efficiency.png",
                                             "frozen features: test AUC vs labels used")
    (out / "label_efficiency.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def finetune_config(cfg: DemoConfig, labels: Path, init: Path | None, out: Path):
    """The protocol's configuration; the labels may point outside their folder only when they
    are :func:`select_subjects`' copy (whose paths it checked against the original's folder)."""
    from .finetune.engine import TrainConfig
    from .finetune.protocol import ProtocolConfig

    train = TrainConfig(epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch,
                        img_size=cfg.img_size, warmup_epochs=min(2, cfg.finetune_epochs - 1),
                        patience=cfg.patience or None, progress=cfg.progress,
                        threads=cfg.threads, lr=None if cfg.lr_grid else cfg.finetune_lr,
                        smoothing=0.0,
                        crop_min=cfg.crop_min, drop_path=0.1)
    return ProtocolConfig(labels=str(labels), out_dir=str(out), models=list(cfg.models),
                          init=str(init) if init else None, folds=cfg.folds,
                          test_size=cfg.test_size, seed=cfg.seed, n_boot=cfg.n_boot,
                          selection="inner" if cfg.patience else "fixed",
                          lr_grid=list(cfg.lr_grid),
                          allow_outside_root=Path(labels) != Path(cfg.labels),
                          title="USF-MAE demo: pretraining, fine-tuning, Score-CAM", train=train)


def scorecam_stage(cfg: DemoConfig, finetune_report: dict, finetune_dir: Path, test,
                   out: Path) -> dict:
    """Score-CAM of the MAE-initialised model's best fold (validation AUC) on the lesion images
    of the test set (a ``LabelledSet``)."""
    from .explain.run import explain_images

    models = finetune_report["models"]
    name = "usfmae" if "usfmae" in models else next(iter(models))
    folds = finetune_report["models"][name]["cv"]["folds"]
    best = int(np.argmax([f["auc"] if f["auc"] is not None else -1 for f in folds]))
    label_of = {p: test.classes[i] for p, i in zip(test.paths, test.labels)}
    images = [p for p, c in label_of.items() if c in LESION_CLASSES]
    summary = explain_images(finetune_dir / name / f"fold{best}" / "best.safetensors", images,
                             out, masks=cfg.masks, labels=label_of)  # explain the true class
    per_class = {}
    for c in LESION_CLASSES:
        hits = [r["pointing_game"] for r in summary["images"]
                if label_of[r["image"]] == c and "pointing_game" in r]
        per_class[c] = float(np.mean(hits)) if hits else None
    shadow = shadow_test(summary, Path(cfg.masks).parent / "masks_shadow", out, label_of)
    return {**summary, "model_name": name, "fold": best, "pointing_game_per_class": per_class,
            "shadow_test": shadow}


def shadow_test(summary: dict, shadow_masks: Path, out: Path, label_of: dict) -> dict | None:
    """Is the evidence for a solid lesion its posterior shadow? The share of each Score-CAM
    map's energy inside the simulated shadow region (``masks_shadow/``, written by the
    simulator) minus that region's share of the image (what a uniform map puts there), averaged
    per subject, with a Student-t interval over subjects; None without shadow masks."""
    from .explain.localization import energy_in_mask
    from .explain.run import find_mask, mask_index
    from .finetune.claims import difference_sentence
    from .finetune.metrics import fold_mean_ci

    if not shadow_masks.is_dir():
        return None
    index = mask_index(shadow_masks)
    per_subject: dict[str, list[float]] = {}
    for record in summary["images"]:
        if label_of.get(record["image"]) != "solid":
            continue
        heat = np.load(out / "heatmaps" / f"{record['name']}.npy")
        mask = find_mask(Path(record["image"]), index, heat.shape)
        if mask is None or not mask.any():
            continue
        subject = Path(record["image"]).stem.rsplit("_v", 1)[0]
        per_subject.setdefault(subject, []).append(
            float(energy_in_mask(heat, mask)) - float(mask.mean()))
    values = [float(np.mean(v)) for v in per_subject.values()]
    ci = fold_mean_ci(values, bounds=(-1.0, 1.0))
    return {"subjects": len(values), "images": sum(map(len, per_subject.values())),
            "mean_excess_energy": float(np.mean(values)) if values else None,
            "ci": ci, "claim": difference_sentence(
                "Score-CAM", "uniform map", "share of map energy in the posterior shadow of "
                "solid lesions", ci)}


def _rebased(figures: dict, folder: str) -> dict:
    return {k: f"{folder}/{v}" for k, v in figures.items()}


def baseline_claims(pretrain: dict) -> dict:
    """The pretrained MAE's held-out loss against each trivial predictor, paired over the same
    seeded mask draws (t-interval of the per-draw difference), with generated claims."""
    from .finetune.claims import difference_sentence
    from .finetune.metrics import fold_mean_ci

    draws = pretrain.get("heldout_per_draw") or {}
    numbers, claims = {}, []
    for name in ("zero", "visible_mean", "patch_mean"):
        if "end" not in draws or name not in draws:
            continue
        diffs = [float(a - b) for a, b in zip(draws["end"], draws[name])]
        ci = fold_mean_ci(diffs, bounds=None)
        numbers[f"mae_minus_{name}_loss"] = float(np.mean(diffs))
        numbers[f"mae_minus_{name}_loss_ci_low"], numbers[f"mae_minus_{name}_loss_ci_high"] = ci
        claims.append(difference_sentence("pretrained MAE", f"{name} predictor",
                                          "held-out reconstruction loss", ci))
    return {"title": "Pretraining against trivial predictors",
            "text": (f"{pretrain.get('baseline_method', '')} Differences are the pretrained "
                     "model's loss minus the predictor's on the same mask draws (negative: the "
                     "model reconstructs better); interval: Student-t over the draws.\n\n"
                     + "\n".join(f"- {c}" for c in claims)),
            "numbers": numbers}


def efficiency_section(result: dict) -> dict:
    """The label-efficiency section: every arm's mean test AUC per share of labels with its
    interval, the paired differences, and the claims generated from them."""
    numbers, claims = {}, []
    for arm, rows in result["results"].items():
        for row in rows:
            key = f"{arm}_auc_at_{row['fraction']:g}"
            numbers[key] = row["mean"]
            numbers[f"{key}_ci_low"], numbers[f"{key}_ci_high"] = row["ci"]
    for diff in result["differences"]:
        key = f"{diff['a']}_minus_{diff['b']}_at_{diff['fraction']:g}"
        numbers[key] = diff["mean"]
        numbers[f"{key}_ci_low"], numbers[f"{key}_ci_high"] = diff["ci"]
        claims.append(f"With `{diff['fraction']:g}` of the development subjects' labels: "
                      f"{diff['sentence']}")
    return {"title": "Label efficiency (frozen features)",
            "text": (result["method"] + "\n\n" + "\n".join(f"- {c}" for c in claims)),
            "numbers": numbers}


def build_report(finetune_report: dict, ingest: dict, sim_meta: dict, pre_stats: dict,
                 pretrain: dict, cam: dict, seconds: dict, efficiency: dict) -> dict:
    """The fine-tuning report with the other stages' sections and figures, paths relative to
    the demo folder."""
    report = json.loads(json.dumps(finetune_report))
    for entry in report["models"].values():
        entry["figures"] = _rebased(entry.get("figures", {}), "finetune")
    titles = {"loss_curve": "pretraining loss", "reconstruction":
              "reconstructions of held-out images (original / masked / reconstruction)"}
    report["figures"] = {
        "label efficiency: test AUC of logistic regression on frozen features":
            "label_efficiency/label_efficiency.png",
        **{title: f"pretrain/{Path(pretrain['artefacts'][key]).name}"
           for key, title in titles.items() if key in pretrain["artefacts"]},
        f"Score-CAM of {cam['model_name']} fold {cam['fold']} on test lesions "
        "(mask outlines)": "scorecam/grid.png"}
    sim = {"simulated_images": sim_meta.get("images"),
           "simulated_subjects_per_class": sim_meta.get("subjects_per_class")}
    loss_name = ("norm_pix_loss" if pretrain["config"]["model"]["norm_pix_loss"]
                 else "plain-pixel loss")
    report["sections"] = [
        {"title": "Data",
         "text": ("Pretraining: every frame of the pydicom-data ultrasound DICOMs through "
                  "`usfmae-fast ingest` (exact duplicates dropped) plus simulated subjects that "
                  "carry no label anywhere (`unlabelled/` of the simulated set, disjoint from "
                  "every labelled subject). Fine-tuning: the simulated B-mode set "
                  "(pymust; physics in demo_data/bmode_sim/metadata.json)."),
         "numbers": {"dicom_files": ingest["files"], "frames_read": ingest["frames_read"],
                     "frames_written": ingest["frames_written"],
                     "duplicates_removed": ingest["duplicates_removed"],
                     "pretraining_real_frames": pre_stats["real_frames"],
                     "pretraining_simulated_images": pre_stats["simulated_images"],
                     **{k: v for k, v in sim.items() if v is not None}}},
        {"title": "Pretraining",
         "text": (f"ViT-MAE {pretrain['model_config']['embed_dim']} wide x "
                  f"{pretrain['model_config']['depth']} blocks, patch "
                  f"{pretrain['model_config']['patch_size']}, mask ratio "
                  f"{pretrain['config']['optim']['mask_ratio']}, "
                  f"{loss_name}, on "
                  f"{pretrain['throughput']['device'] if pretrain['throughput'] else 'cpu'}."),
         "numbers": {"steps": pretrain["steps"], "first_loss_mean": pretrain["first_loss_mean"],
                     "last_loss_mean": pretrain["last_loss_mean"],
                     "heldout_loss_before": pretrain["heldout_loss_init"],
                     "heldout_loss_after": pretrain["heldout_loss_end"],
                     **{f"heldout_loss_{name}_predictor": value
                        for name, value in (pretrain.get("heldout_baselines") or {}).items()},
                     "images_per_s": (pretrain["throughput"] or {}).get("images_per_s"),
                     "train_seconds": pretrain["train_seconds"]}},
        baseline_claims(pretrain),
        efficiency_section(efficiency),
        *report.get("sections", []),
        {"title": "Score-CAM",
         "text": (f"Score-CAM (`{cam['target_layer']}`, {cam['score']} scores, {cam['weights']} "
                  f"weights) of the best {cam['model_name']} fold on the test set's lesion "
                  "images, explaining each image's true class; pointing game: the heatmap's "
                  "maximum lies within `tolerance` pixels of the lesion mask; energy: the share "
                  "of the heatmap inside the mask; an all-zero map scores a miss and no energy "
                  "in both. Beside them, what a centre pointer and a uniform map score on the "
                  "same images. Faithfulness: area under the explained class's probability as "
                  "the most salient pixels are blurred away (deletion, lower is better) or put "
                  "back (insertion, higher is better), for Score-CAM, Grad-CAM, Eigen-CAM and "
                  "a random map."
                  + (" Shadow hypothesis (solid lesions): the share of the map's energy in the "
                     "simulated posterior-shadow region minus that region's share of the image "
                     "(a uniform map's), per subject. " + cam["shadow_test"]["claim"]
                     if cam.get("shadow_test") else "")),
         "numbers": {"images_with_masks": cam["images_with_masks"],
                     "tolerance": cam["tolerance"], "zero_maps": cam["zero_maps"],
                     **{f"{score}{suffix}": cam.get(f"{score}{suffix}")
                        for score in ("pointing_game", "energy_in_mask")
                        for suffix in ("", "_centre_pointer", "_uniform_map")},
                     **{f"pointing_game_{c}": v
                        for c, v in cam["pointing_game_per_class"].items()},
                     **({"shadow_subjects": cam["shadow_test"]["subjects"],
                         "shadow_excess_energy": cam["shadow_test"]["mean_excess_energy"],
                         "shadow_excess_energy_ci_low": cam["shadow_test"]["ci"][0],
                         "shadow_excess_energy_ci_high": cam["shadow_test"]["ci"][1]}
                        if cam.get("shadow_test") else {}),
                     **{f"{method}_{kind}": value
                        for method, areas in ((cam.get("faithfulness") or {})
                                              .get("methods") or {}).items()
                        for kind, value in areas.items()}}},
        {"title": "Run time", "text": "Wall-clock seconds of each stage.",
         "numbers": {f"{k}_seconds": v for k, v in seconds.items()}},
    ]
    return report


def run_demo(cfg: DemoConfig | None = None) -> dict:
    """Run every stage into ``cfg.out_dir`` (held for the run: :class:`~.runtime.lock.FolderBusy` if
    another run holds it); returns the report (also ``report.json``)."""
    cfg = (cfg or DemoConfig()).validate()
    with output_lock(cfg.out_dir, "demo"):
        return _run_stages(replace(cfg, threads=cfg.threads or free_cores()))


def _run_stages(cfg: DemoConfig) -> dict:
    from .finetune.protocol import run_protocol, split_test_set
    from .finetune.report import write_report

    out = Path(cfg.out_dir)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    seconds: dict[str, float] = {}

    _say(cfg, f"about {eta_seconds(cfg, {}) / 60:.1f} min on a 2-core CPU machine; each stage "
              "prints the time left")

    def stage(name: str, fn, *args):
        _say(cfg, f"{name} ...")
        started = time.perf_counter()
        result = fn(*args)
        seconds[name] = round(time.perf_counter() - started, 1)
        left = eta_seconds(cfg, seconds)
        finish = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
        _say(cfg, f"{name} done in {seconds[name]} s; about {left / 60:.1f} min left "
                  f"(ETA {finish})" if left > 0 else f"{name} done in {seconds[name]} s")
        return result

    labels = select_subjects(Path(cfg.labels), cfg.subjects_per_class, out / "labels.csv")
    protocol = finetune_config(cfg, labels, None, out / "finetune")
    protocol.train.validate()
    dev, test = split_test_set(protocol)  # the protocol's own split; bad labels fail here, first
    ingest = stage("ingest", ingest_stage, cfg, out / "ingest")
    labelled = {str(Path(p).resolve()) for p in [*dev.paths, *test.paths]}
    source, pre_stats = pretraining_images(out / "ingest", unlabelled_images(cfg.unlabelled),
                                           labelled, out / "pretrain_images.csv")
    pretrain = stage("pretrain", pretrain_stage, cfg, source, pre_stats, out / "pretrain")
    (out / "label_efficiency").mkdir(parents=True, exist_ok=True)
    efficiency = stage("label_efficiency", label_efficiency_stage, cfg,
                       pretrain["artefacts"]["weights"], dev, test, out / "label_efficiency")
    protocol = replace(protocol, init=pretrain["artefacts"]["weights"])
    finetune = stage("finetune", run_protocol, protocol)
    cam = stage("scorecam", scorecam_stage, cfg, finetune, out / "finetune", test,
                out / "scorecam")
    meta_path = Path(cfg.labels).parent / "metadata.json"
    sim_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    report = build_report(finetune, ingest, sim_meta, pre_stats, pretrain, cam, seconds,
                          efficiency)
    report["demo_provenance"] = provenance(
        config=asdict(cfg), seed=cfg.seed, device=pretrain["provenance"]["device"],
        files={"labels": labels, "pretrained_weights": pretrain["artefacts"]["weights"]})
    (out / "provenance.json").write_text(json.dumps(report["demo_provenance"], indent=2))
    json_path, md_path = write_report(report, out)
    _say(cfg, f"report: {md_path.resolve()} (numbers: {json_path.resolve()})")
    return report
