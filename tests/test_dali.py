"""The DALI loader (CPU-only mode here; the GPU path runs the same graph with "mixed" decoding)
against the torch DataLoader reference: shapes, dtypes, value ranges, seeded determinism,
the shared sampling plan and sharding, matching batch statistics, and bad files skipped."""
import csv
import warnings
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from PIL import Image

from usfmae_fast.data.load import loader as loader_module
from usfmae_fast.data.load.dali import DaliImageLoader, dali_available
from usfmae_fast.data.load.image_files import BadImageWarning
from usfmae_fast.data.load.loader import make_loader
from usfmae_fast.data.load.base import US_MEAN, US_STD
from usfmae_fast.data.load.torch_loader import TorchImageLoader

from test_image_files import corrupt_idat

DALI, DALI_WHY = dali_available()
requires_dali = pytest.mark.skipif(not DALI, reason=DALI_WHY)
LEVEL = 1 / 255 / US_STD  # one gray level in normalised units


def gradient_image(rng, h, w):
    """R falls from left to right, G rises from top to bottom, B is flat: every channel has
    its own mean, and flips, rotations and channel order all show in the statistics."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 - x * (200 / w), y * (150 / h) + 40, np.full((h, w), 200.0)], -1)
    return (rgb + rng.normal(0, 6, rgb.shape)).clip(0, 255).astype(np.uint8)


def write_images(root, n, h=48, w=64, ext="png"):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(gradient_image(rng, h, w)).save(root / f"{i:03d}.{ext}", quality=95)
    return root


def write_index_labels(root, n, ext="png"):
    """labels.csv giving image i the label i, so a batch's labels say which images it holds."""
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + [(f"{i:03d}.{ext}", i) for i in range(n)])
    return root / "labels.csv"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 64)


def batches(loader, epochs=1):
    return [batch for _ in range(epochs) for batch in loader]


def load(source, backend, **kw):
    kw = {"batch_size": 8, "img_size": 32, "workers": 2 if backend == "dali" else 0} | kw
    return make_loader(source, backend=backend, **kw)


@requires_dali
@pytest.mark.parametrize("kind, channels, dtype", [("pretrain", 1, torch.float32),
                                                   ("train", 3, torch.bfloat16),
                                                   ("eval", 3, torch.float16)])
def test_dali_shapes_dtypes_and_value_range(images, kind, channels, dtype):
    labels = write_index_labels(images, 64) if kind != "pretrain" else None
    loader = load(images, "dali", kind=kind, channels=channels, dtype=dtype, labels=labels,
                  rotate=20 if kind == "train" else 0)
    assert loader.backend == "dali-cpu"  # no GPU here: DALI's CPU-only mode
    out = batches(loader)
    assert len(out) == len(loader) == 8
    lo, hi = (0 - US_MEAN) / US_STD, (1 - US_MEAN) / US_STD
    for x, y in out:
        assert x.shape == (8, channels, 32, 32) and x.dtype == dtype and x.device.type == "cpu"
        assert lo - 0.01 <= x.min() and x.max() <= hi + 0.01
        assert x.float().std() > 0.3  # real image content, not a constant
        if kind == "pretrain":
            assert y is None
        else:
            assert y.dtype == torch.int64 and y.shape == (8,) and 0 <= y.min() and y.max() < 64


@requires_dali
def test_dali_is_deterministic_for_a_seed(images):
    first = batches(load(images, "dali", seed=3, rotate=15), epochs=2)
    second = batches(load(images, "dali", seed=3, rotate=15), epochs=2)
    other = batches(load(images, "dali", seed=4, rotate=15), epochs=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert not torch.equal(first[0][0], first[8][0])  # epoch 2 is a new draw
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=requires_dali), "torch"])
def test_plan_epochs_and_rank_shards(images, backend):
    """Both loaders follow the same plan: the same images in the same batches, a new order
    each epoch, ``set_epoch`` to jump to one, disjoint equal shards per rank."""
    labels = write_index_labels(images, 64)

    def order(loader, epochs=1):
        return [y.tolist() for _, y in batches(loader, epochs)]

    run = order(load(images, backend, kind="train", labels=labels, seed=1), epochs=2)
    reference = order(load(images, "torch", kind="train", labels=labels, seed=1), epochs=2)
    assert run == reference
    assert sorted(sum(run[:8], [])) == list(range(64)) and run[:8] != run[8:]
    resumed = load(images, backend, kind="train", labels=labels, seed=1)
    resumed.set_epoch(1)
    assert order(resumed) == run[8:]
    shards = [order(load(images, backend, kind="train", labels=labels, seed=1, rank=r,
                         world_size=3, batch_size=5)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # 64 // 3 = 21 images -> 4 full batches
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)) == 60
    evals = [order(load(images, backend, kind="eval", labels=labels, rank=r, world_size=3,
                        batch_size=5)) for r in range(3)]
    assert sorted(i for s in evals for b in s for i in b) == list(range(64))


def summary(x: torch.Tensor) -> dict:
    x = x.float()
    half = x.shape[-1] // 2
    return {"mean": x.mean((0, 2, 3)), "std": x.std((0, 2, 3)),
            "left-right": x[..., :half].mean() - x[..., half:].mean(),
            "top-bottom": x[..., :half, :].mean() - x[..., half:, :].mean()}


def mismatch(a: dict, b: dict) -> list[str]:
    """The statistics on which two sets of batches disagree beyond sampling noise (measured:
    below 0.05 between DALI and torch, and between seeds, at 128 images of 32 x 32)."""
    bad = [] if len(a["mean"]) == len(b["mean"]) else ["channels"]
    if not bad and (a["mean"] - b["mean"]).abs().max() > 0.12:
        bad.append("mean")
    if not bad and ((a["std"] - b["std"]).abs() / b["std"]).max() > 0.12:
        bad.append("std")
    bad += [k for k in ("left-right", "top-bottom") if abs(a[k] - b[k]) > 0.12]
    return bad


@requires_dali
@pytest.mark.parametrize("channels, rotate", [(1, 0.0), (3, 0.0), (3, 30.0)])
def test_dali_batches_match_torch_statistically(images, channels, rotate):
    kw = dict(channels=channels, rotate=rotate, batch_size=16, seed=0)
    dali = summary(torch.cat([x for x, _ in batches(load(images, "dali", **kw), epochs=2)]))
    ref_batches = torch.cat([x for x, _ in batches(load(images, "torch", **kw), epochs=2)])
    ref = summary(ref_batches)
    assert mismatch(dali, ref) == []
    assert abs(ref["left-right"]) < 0.12  # flipped half of the time ...
    assert ref["top-bottom"] < -0.2       # ... horizontally only
    # the comparison does catch the bugs it is there for
    assert mismatch(summary(ref_batches * US_STD + US_MEAN), ref)  # normalisation left out
    assert mismatch(summary(-ref_batches), ref)                    # range inverted
    if channels == 3:
        assert mismatch(summary(ref_batches.flip(1)), ref)           # BGR for RGB
        assert mismatch(summary(ref_batches[:, :1]), ref)            # wrong channel count
        no_flip = summary(torch.cat([x for x, _ in batches(load(images, "torch", kind="eval",
                                                                channels=3))]))
        assert "left-right" in mismatch(no_flip, ref)
    if rotate:
        unrotated = summary(torch.cat([x for x, _ in batches(load(images, "torch", **kw | {
            "rotate": 0.0}), epochs=2)]))
        assert mismatch(unrotated, ref)  # black corners move the flat blue channel


@requires_dali
@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize("channels", [1, 3])
def test_dali_eval_matches_torch_pixelwise(tmp_path, ext, channels):
    """Resize + centre crop is deterministic: where the geometry is exact (64 x 96 -> 32 x 48,
    crop from column 8) DALI and torch agree within interpolation rounding."""
    root = write_images(tmp_path, 6, h=64, w=96, ext=ext)
    dali = torch.cat([x for x, _ in load(root, "dali", kind="eval", channels=channels)])
    ref = torch.cat([x for x, _ in load(root, "torch", kind="eval", channels=channels)])
    assert dali.shape == ref.shape == (6, channels, 32, 32)
    diff = (dali - ref).abs()
    assert diff.max() <= 3 * LEVEL + 1e-4 and diff.mean() <= LEVEL
    assert (ref[..., 1:] - ref[..., :-1]).abs().mean() > 1.5 * LEVEL  # a 1-pixel shift fails


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=requires_dali), "torch"])
def test_bad_files_are_skipped_with_a_warning(tmp_path, backend):
    root = write_images(tmp_path, 12, h=24, w=32)
    good = (root / "000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(corrupt_idat(good))  # passes the header check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the torch loader decodes in worker processes here: their failures reach the parent
        ev = load(root, backend, kind="eval", batch_size=5, workers=2)
        eval_counts = [len(x) for x, _ in batches(ev, epochs=2)]
        pre = load(root, backend, batch_size=4, workers=2)
        pre_counts = [len(x) for x, _ in batches(pre, epochs=2)]
    messages = " ".join(str(w.message) for w in caught if w.category is BadImageWarning)
    for name in ("truncated.png", "empty.png", "corrupt.png"):
        assert name in messages
    assert sum(eval_counts) == 2 * 12  # every good image, each epoch, nothing else
    # 13 listed, 12 planned per epoch: an epoch whose plan holds corrupt.png yields 11
    assert len(pre_counts) == 2 * len(pre) == 6 and set(pre_counts) <= {3, 4}
    assert sum(pre_counts) >= 2 * 11
    # found once, then left out: later epochs never meet it again
    assert sum(str(w.message).count("corrupt.png") for w in caught) == 2  # eval + pretrain


def test_backend_choice(images, monkeypatch):
    auto = load(images, "auto")
    assert auto.backend == ("dali-cpu" if DALI else "torch")
    assert isinstance(load(images, "torch"), TorchImageLoader)
    if DALI:  # DALI imports but cannot build a pipeline here: auto falls back, "dali" raises
        with monkeypatch.context() as patch:
            patch.setattr(DaliImageLoader, "_build", Mock(side_effect=RuntimeError("no driver")))
            with pytest.warns(RuntimeWarning, match="no driver"):
                assert isinstance(load(images, "auto"), TorchImageLoader)
            with pytest.raises(RuntimeError, match="no driver"):
                load(images, "dali")
    monkeypatch.setattr(loader_module, "dali_available", lambda: (False, "not installed"))
    assert isinstance(load(images, "auto"), TorchImageLoader)  # the fallback
    with pytest.raises(ImportError, match="not installed"):
        load(images, "dali")
    with pytest.raises(ValueError, match="needs labels"):
        load(images, "torch", kind="train")
    with pytest.raises(ValueError, match="lower batch_size"):
        load(images, "torch", batch_size=65)


def test_torch_loader_augmentation_does_not_depend_on_workers(images):
    """The reference is reproducible per (seed, epoch, index), in or out of worker processes."""
    inline = batches(load(images, "torch", rotate=10, workers=0), epochs=2)
    workers = batches(load(images, "torch", rotate=10, workers=2), epochs=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(inline, workers))
    assert not torch.equal(inline[0][0], inline[8][0])


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=requires_dali)])
def test_crop_scale_sets_the_random_crop_area(images, backend):
    """The green channel rises top to bottom: whole-image crops keep its full range, crops of
    10-20 % of the area keep a fraction of it."""
    def vertical_range(crop_scale):
        x = torch.cat([x for x, _ in batches(load(images, backend, kind="pretrain", channels=3,
                                                  crop_scale=crop_scale, seed=1))])
        green = x[:, 1].float()
        return float((green[:, -8:].mean() - green[:, :8].mean()) * US_STD * 255)

    whole, small = vertical_range((1.0, 1.0)), vertical_range((0.1, 0.2))
    assert whole > 100 and small < 0.6 * whole, (whole, small)
    with pytest.raises(ValueError, match="crop_scale"):
        load(images, backend, kind="pretrain", crop_scale=(0.6, 0.5))


USFMAE_AUGMENTATION = dict(resize="nearest", rotate=(0.0, 90.0), rotate_interpolation="nearest",
                           crop_scale=(0.5, 2.0), crop_interpolation="bilinear", hflip=0.5,
                           vflip=0.5)


@requires_dali
def test_dali_matches_torch_with_the_usfmae_augmentation(images):
    kw = dict(channels=3, batch_size=16, seed=0, mean=(0.485, 0.456, 0.406),
              std=(0.229, 0.224, 0.225), **USFMAE_AUGMENTATION)
    dali = summary(torch.cat([x for x, _ in batches(load(images, "dali", **kw), epochs=4)]))
    ref = summary(torch.cat([x for x, _ in batches(load(images, "torch", **kw), epochs=4)]))
    assert mismatch(dali, ref) == []
    assert abs(ref["left-right"]) < 0.12 and abs(ref["top-bottom"]) < 0.12  # both flips
    fb_mae = summary(torch.cat([x for x, _ in batches(load(images, "torch", **kw | dict(
        rotate=0.0, vflip=0.0)), epochs=4)]))
    assert mismatch(fb_mae, ref)  # the rotation's black corners and the flips show


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=requires_dali)])
def test_crop_area_above_one_falls_back_to_the_whole_image(tmp_path, backend):
    """torchvision's RandomResizedCrop semantics in both loaders: an area fraction above 1
    never fits, so with scale (0.5, 2.0) a crop is the whole image only when 10 draws in a row
    fail (5.5 % of the time for a square image, by torchvision's own get_params)."""
    root = tmp_path / "square"
    root.mkdir()
    y, x = np.mgrid[0:64, 0:64]
    ramp = (2 * y + 2 * x).astype(np.uint8)  # every crop but the whole image differs from it
    Image.fromarray(ramp).save(root / "ramp.png")
    loader = load(root, backend, kind="pretrain", batch_size=1, img_size=64, mean=0, std=1,
                  hflip=0.0, crop_scale=(0.5, 2.0), crop_interpolation="nearest", seed=2)
    crops = torch.cat([x for x, _ in batches(loader, epochs=400)])[:, 0]
    whole = ((crops * 255 - torch.from_numpy(ramp).float()).abs().amax((1, 2)) < 0.5).float()
    assert 0.025 < whole.mean() < 0.1, whole.mean()
    with pytest.raises(ValueError, match="crop_scale"):  # DALI fails on a square image there
        load(root, backend, kind="pretrain", crop_scale=(1.5, 2.0))
