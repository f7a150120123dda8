"""The demo end to end at a reduced size (real pydicom-data frames, a very small ViT-MAE), plus
the pieces it is built from: the seeded dataset, the lr schedule, the weight-decay groups."""
import csv
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom.data")

from usfmae_fast.data.torch_loader import GrayFrameDataset  # noqa: E402
from usfmae_fast.train.optim import param_groups, warmup_cosine  # noqa: E402

SMALL = dict(steps=40, batch_size=16, img_size=32, patch_size=8, seed=0, embed_dim=64, depth=2,
             num_heads=2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
             blr=0.02, holdout=3, max_frames_per_file=8, num_threads=1, progress=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from usfmae_fast.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, **SMALL)


def test_demo_writes_every_artefact(demo):
    from PIL import Image

    out, metrics = demo
    for name in ("loss_curve.png", "reconstruction.png", "metrics.json", "history.csv",
                 "checkpoint.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("loss_curve.png", "reconstruction.png"):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) >= 200
            assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_demo_metrics(demo):
    _, metrics = demo
    assert metrics["steps"] == SMALL["steps"] and metrics["batch_size"] == SMALL["batch_size"]
    frames = metrics["frames"]
    assert frames["files"] >= 1 and frames["train"] >= SMALL["batch_size"]
    assert frames["heldout"] == SMALL["holdout"] == len(frames["heldout_files"])
    assert frames["used"] == frames["train"] + frames["heldout"]
    for key in ("first_loss_mean", "last_loss_mean", "final_loss", "heldout_loss_before",
                "heldout_loss_after", "images_per_s", "train_seconds"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["model_config"]["img_size"] == SMALL["img_size"]
    assert metrics["model_config"]["in_chans"] == 1


def test_demo_loss_falls(demo):
    out, metrics = demo
    with (out / "history.csv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == SMALL["steps"]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.9 * first, (first, last)
    assert metrics["last_loss_mean"] < metrics["first_loss_mean"]
    assert metrics["heldout_loss_after"] < metrics["heldout_loss_before"]


def test_checkpoint_reloads_to_the_same_model(demo):
    from usfmae_fast.models.checkpoint import load_model, read_checkpoint

    out, metrics = demo
    state, config = read_checkpoint(out / "checkpoint.safetensors")
    assert config == metrics["model_config"]
    model = load_model(out / "checkpoint.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


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
