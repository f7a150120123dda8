"""The main job end to end at the CI size (``usfmae-fast demo --quick``): every stage runs on
the real pydicom-data frames and the committed simulated set, every artefact is written, and
every number in report.md is the one in report.json; plus the pieces the pretraining stage is
built from (the seeded dataset, the lr schedule, the weight-decay groups)."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom.data")

from test_finetune_report import json_numbers  # noqa: E402

from usfmae_fast.data.load.torch_loader import GrayFrameDataset  # noqa: E402
from usfmae_fast.finetune.report import fmt, parse_report_numbers  # noqa: E402
from usfmae_fast.runtime.optim import param_groups, warmup_cosine  # noqa: E402

MODELS = ("usfmae", "vit_scratch", "resnet18")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from usfmae_fast.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--threads", "1", "--quiet"]) == 0
    return out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def _png(path):
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 32, path
        return np.asarray(img.convert("L")).std() > 5  # not a blank canvas


def test_every_artefact_exists(demo):
    out, report, md = demo
    assert (out / "ingest" / "manifest.csv").is_file()
    for name in ("checkpoint.safetensors", "history.csv", "summary.json"):
        assert (out / "pretrain" / name).stat().st_size > 0, name
    assert list(report["models"]) == list(MODELS)
    for name in MODELS:
        folds = sorted((out / "finetune" / name).glob("fold*/best.safetensors"))
        assert len(folds) == report["task"]["folds"] == 2
        assert (out / "finetune" / name / "test_predictions.csv").is_file()
    assert (out / "finetune" / "splits.csv").is_file()
    figures = [*report["figures"].values()] + [f for m in report["models"].values()
                                               for f in m["figures"].values()]
    assert {"pretrain/loss_curve.png", "pretrain/reconstruction.png",
            "scorecam/grid.png"} <= set(figures)
    for figure in figures:
        assert _png(out / figure) and f"]({figure})" in md
    cam = json.loads((out / "scorecam" / "summary.json").read_text())
    assert cam["images_with_masks"] == len(cam["images"]) > 0  # every lesion has its mask


def test_the_demo_records_its_provenance(demo):
    import hashlib

    out, report, _ = demo
    record = json.loads((out / "provenance.json").read_text())
    assert record == report["demo_provenance"] and record["seed"] == 0
    weights = out / "pretrain" / "checkpoint.safetensors"
    assert record["files"]["pretrained_weights"]["sha256"] == \
        hashlib.sha256(weights.read_bytes()).hexdigest()
    pretrain = json.loads((out / "pretrain" / "summary.json").read_text())
    assert pretrain["provenance"]["config"] == pretrain["config"]


def test_report_numbers_equal_report_json(demo):
    _, report, md = demo
    tables = parse_report_numbers(md)
    tokens = {t for rows in tables.values() for numbers in rows.values() for t in numbers}
    assert len(tokens) > 50 and not tokens - json_numbers(report)
    for section in report["sections"]:
        assert tables[section["title"]] == {k: [fmt(v)] for k, v in section["numbers"].items()}
    for name, model in report["models"].items():
        ensemble, ci = model["test"]["ensemble"], model["test"]["ensemble_ci"]
        assert tables["Comparison on the held-out test set"][name][:3] == [
            fmt(ensemble["auc"]), *map(fmt, ci["auc"])]


def test_stages_report_what_they_did(demo):
    out, report, _ = demo
    numbers = {s["title"]: s["numbers"] for s in report["sections"]}
    data = numbers["Data"]
    assert data["frames_written"] == data["pretraining_real_frames"] > 0
    with (out / "finetune" / "splits.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    test_images = {r["path"] for r in rows if r["set"] == "test"}
    with (out / "pretrain_images.csv").open(newline="") as f:
        pretraining = {r["path"] for r in csv.DictReader(f)}
    labelled = {r["path"] for r in rows}
    assert test_images and not labelled & pretraining  # the MAE never saw a labelled image
    from usfmae_fast.demo import DemoConfig, unlabelled_images
    assert data["pretraining_simulated_images"] == len(unlabelled_images(
        DemoConfig().unlabelled))
    pre = numbers["Pretraining"]
    assert pre["steps"] == 20 and np.isfinite(pre["last_loss_mean"])
    assert pre["last_loss_mean"] < pre["first_loss_mean"]
    cam = numbers["Score-CAM"]
    assert 0 <= cam["pointing_game"] <= 1 and 0 <= cam["energy_in_mask"] <= 1
    assert set(numbers["Run time"]) == {f"{s}_seconds" for s in
                                        ("ingest", "pretrain", "label_efficiency",
                                         "finetune", "scorecam")}


def test_bad_labels_fail_before_any_stage(tmp_path):
    from usfmae_fast.cli import main

    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,patient_id\nmissing.png,cyst,p1\n")
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out), "--quiet", "--labels", str(labels)]) == 2
    assert not (out / "ingest").exists()


def test_dataset_is_seeded_per_epoch_and_index():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (90, 120), dtype=np.uint8) for _ in range(3)]
    a = GrayFrameDataset(frames, 32, train=True, seed=1)
    b = GrayFrameDataset(frames, 32, train=True, seed=1)
    x = a[2]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, b[2])
    a.set_epoch(1)
    assert not torch.equal(a[2], x)
    ev = GrayFrameDataset(frames, 32, train=False, mean=0.5, std=0.25)
    torch.testing.assert_close(ev[0], ev[0])
    assert ev.denormalise(ev[0]).min() >= 0 and ev.denormalise(ev[0]).max() <= 1


def test_lr_schedule_and_weight_decay_groups():
    peak = 1e-3 * 64 / 256
    lr_at = lambda step: warmup_cosine(step, peak, 1e-5, 10, 100)  # noqa: E731
    assert lr_at(0) == pytest.approx(peak / 10)
    assert lr_at(9) == pytest.approx(peak)
    assert lr_at(99) == pytest.approx(1e-5, abs=peak * 1e-3)
    lrs = [lr_at(s) for s in range(10, 100)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))

    from usfmae_fast.models.mae import mae_vit

    model = mae_vit("tiny", img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=1,
                    num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert {"cls_token", "mask_token"} <= {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith("token") for p in no_decay["params"])


def test_eta_scales_with_the_work_and_the_pace():
    from dataclasses import replace

    from usfmae_fast.demo import REFERENCE_SECONDS, DemoConfig, eta_seconds

    reference = replace(DemoConfig(), pretrain_steps=300, lr_grid=(1e-3, 3e-3))  # measured
    assert eta_seconds(reference, {}) == pytest.approx(sum(REFERENCE_SECONDS.values()))
    twice = {"ingest": 2 * REFERENCE_SECONDS["ingest"]}  # a machine half as fast so far
    rest = sum(v for k, v in REFERENCE_SECONDS.items() if k != "ingest")
    assert eta_seconds(reference, twice) == pytest.approx(2 * rest)
    doubled = replace(reference, finetune_epochs=2 * reference.finetune_epochs)
    assert eta_seconds(doubled, {}) == pytest.approx(
        sum(REFERENCE_SECONDS.values()) + REFERENCE_SECONDS["finetune"])


def test_same_seed_same_report(demo, tmp_path):
    """A second run with the same seed writes the same numbers (timings and provenance aside)."""
    from usfmae_fast.cli import main

    _, report, _ = demo
    assert main(["demo", "--quick", "--out", str(tmp_path), "--threads", "1", "--quiet"]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    for name in MODELS:
        assert again["models"][name]["test"] == report["models"][name]["test"]
        assert again["models"][name]["cv"] == report["models"][name]["cv"]
    assert again["comparisons"] == report["comparisons"]
    timed = ("Run time", "Pretraining", "Splits and seeds")  # hold seconds and images/s
    sections = {s["title"]: s for s in report["sections"] if s["title"] not in timed}
    for section in again["sections"]:
        if section["title"] in sections:
            assert section == sections[section["title"]], section["title"]
    numbers = {s["title"]: s["numbers"] for s in again["sections"]}
    before = {s["title"]: s["numbers"] for s in report["sections"]}
    for key in ("first_loss_mean", "last_loss_mean", "heldout_loss_after"):
        assert numbers["Pretraining"][key] == before["Pretraining"][key]
