"""The simulated B-mode set: the committed images are what the generator describes, the
generator's physics makes the lesions and posterior regions it claims, the unlabelled pool shares
no subject with the labelled one, and a seed reproduces an image bit for bit (short simulations
at low resolution)."""
import csv
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from usfmae_fast.data import simulate
from usfmae_fast.demo import DEMO_SET


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _png(path):
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def test_committed_set_is_complete_and_consistent():
    meta = json.loads((DEMO_SET / "metadata.json").read_text())
    assert meta["physics"] == {**simulate.PHYSICS, "image_pixels": meta["physics"]["image_pixels"],
                               "views_per_subject": meta["physics"]["views_per_subject"]}
    pixels = tuple(meta["physics"]["image_pixels"])
    rows = _rows(DEMO_SET / "labels.csv")
    assert list(rows[0]) == ["path", "label", "patient_id", "mask", "shadow_mask"]
    assert meta["classes"] == list(simulate.CLASSES)
    assert len(rows) == meta["images"] == 3 * meta["subjects_per_class"] * \
        meta["physics"]["views_per_subject"] >= 240
    assert Counter(r["label"] for r in rows) == {c: len(rows) // 3 for c in simulate.CLASSES}
    views = Counter(r["patient_id"] for r in rows)
    assert set(views.values()) == {meta["physics"]["views_per_subject"]}
    for folder in ("images", "masks", "masks_shadow"):  # no file the labels do not list
        listed = {r["path" if folder == "images" else
                    "mask" if folder == "masks" else "shadow_mask"] for r in rows}
        assert {p.relative_to(DEMO_SET).as_posix()
                for p in (DEMO_SET / folder).rglob("*.png")} == listed
    for r in rows:
        assert r["patient_id"].startswith(r["label"])  # a subject has one class
        img, lesion = _png(DEMO_SET / r["path"]), _png(DEMO_SET / r["mask"]) > 0
        shadow = _png(DEMO_SET / r["shadow_mask"]) > 0
        assert img.shape == lesion.shape == shadow.shape == pixels
        assert lesion.any() == shadow.any() == (r["label"] != "normal"), r["path"]
        assert not (lesion & shadow).any()
    unlabelled = _rows(DEMO_SET / "unlabelled_audit.csv")
    assert list(unlabelled[0]) == ["path", "subject_id", "hidden_class"]
    assert len(unlabelled) == meta["unlabelled_images"] == \
        meta["unlabelled_subjects"] * meta["unlabelled_views"] >= 40
    assert Counter(r["hidden_class"] for r in unlabelled) == \
        {c: n for c, n in meta["unlabelled_hidden_classes"].items() if n}
    assert {p.relative_to(DEMO_SET).as_posix() for p in (DEMO_SET / "unlabelled").rglob("*")
            if p.is_file()} == {r["path"] for r in unlabelled}
    assert not {r["subject_id"] for r in unlabelled} & set(views)
    for r in unlabelled:
        assert _png(DEMO_SET / r["path"]).shape == pixels


def test_lesion_geometry_and_echogenicity():
    rng = np.random.default_rng()
    body = simulate.tissue(rng)
    x, z = simulate.image_grid(64)
    plain = simulate.echogenicity(x, z, body, None, "normal")
    for label in ("cyst", "solid"):
        lesion = simulate.lesion(rng, label)
        inside = simulate.inside(lesion, x, z)
        assert inside[np.abs(z - lesion["z"]).argmin(axis=0)[0], :].any()
        behind = simulate.posterior_region(lesion, x, z)
        amp = simulate.echogenicity(x, z, body, lesion, label)
        ratio = amp / plain
        interior = simulate.PHYSICS[f"{label}_interior_db" if label == "cyst" else "solid_lesion_db"]
        assert np.allclose(ratio[inside], 10 ** (interior / 20))  # a weak echo, not anechoic
        assert np.allclose(ratio[~inside & ~behind], 1.0)
        if label == "cyst":  # enhancement behind a cyst, a shadow behind a solid lesion
            assert (ratio[behind] > 1).all()
        else:
            assert (ratio[behind] < 1).all()
        (a0, a1), (b0, b1) = simulate.PHYSICS["lesion_semi_axes_m"]
        assert a0 <= lesion["a"] <= a1 and b0 <= lesion["b"] <= b1
    assert simulate.lesion(rng, "normal") is None


def test_posterior_mask_lies_behind_the_lesion_and_reaches_the_bottom():
    rng = np.random.default_rng(7)
    x, z = simulate.image_grid(32)
    for _ in range(20):
        lesion = simulate.lesion(rng, "solid")
        lesion_mask, shadow_mask = (m > 0 for m in simulate.masks(lesion, 32))
        assert lesion_mask.any() and shadow_mask.any() and not (lesion_mask & shadow_mask).any()
        assert (z[shadow_mask] > lesion["z"]).all()
        assert z[shadow_mask].mean() > z[lesion_mask].mean()
        assert shadow_mask[-1].any()  # the column runs to the bottom of the image, clipped there
        assert np.abs(x[shadow_mask] - lesion["x"]).max() < max(lesion["a"], lesion["b"])
    assert not any(m.any() for m in simulate.masks(None, 32))


def _fake_pymust(body, lesion, label, seed, pixels=128, density=1.0):
    """The tissue model sampled on the grid, a speckle of its own seed: what generate() needs
    without pymust's seconds."""
    x, z = simulate.image_grid(pixels)
    amp = simulate.echogenicity(x, z, body, lesion, label)
    speckle = np.random.default_rng(seed).rayleigh(1.0, size=amp.shape)
    image = np.clip(40 * np.log10(amp * speckle + 1e-3) + 128, 0, 255).astype(np.uint8)
    return image, simulate.masks(lesion, pixels)[0]


def test_generate_keeps_unlabelled_subjects_apart_and_is_seeded(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate, "simulate", _fake_pymust)
    runs = []
    for name in ("a", "b"):
        rows = simulate.generate(tmp_path / name, subjects=2, views=2, seed=3, pixels=24,
                                 unlabelled_subjects=6, progress=False)
        runs.append(rows)
    out = tmp_path / "a"
    labelled = _rows(out / "labels.csv")
    assert len(labelled) == 12 and not any("unlabelled" in v for r in labelled for v in r.values())
    unlabelled = _rows(out / "unlabelled_audit.csv")
    assert len(unlabelled) == 6 and {r["hidden_class"] for r in unlabelled} <= set(simulate.CLASSES)
    assert not {r["subject_id"] for r in unlabelled} & {r["patient_id"] for r in labelled}
    assert not (out / "masks" / "unlabelled").exists() and not list(out.glob("masks*/*/unl*"))
    for r in labelled:
        lesion, shadow = _png(out / r["mask"]) > 0, _png(out / r["shadow_mask"]) > 0
        assert lesion.any() == shadow.any() == (r["label"] != "normal")
        if lesion.any():  # deeper than the lesion
            assert np.nonzero(shadow)[0].mean() > np.nonzero(lesion)[0].mean()
    # no image, subject or scatterer seed of the unlabelled pool is a labelled one's
    labelled_images = {_png(out / r["path"]).tobytes() for r in labelled}
    assert not {_png(out / r["path"]).tobytes() for r in unlabelled} & labelled_images
    labelled_keys = [(label, s, v) for label in simulate.CLASSES for s in range(2) for v in range(2)]
    seeds = [simulate.subject(3, simulate.LABELLED, *k)[3] for k in labelled_keys]
    seeds += [simulate.subject(3, simulate.UNLABELLED, None, s, 0)[3] for s in range(6)]
    assert len(set(seeds)) == len(seeds)  # also across classes: no shared scatterers
    bodies = [simulate.subject(3, simulate.LABELLED, *k)[1]["fat_bottom"] for k in labelled_keys]
    assert not {simulate.subject(3, simulate.UNLABELLED, None, s, 0)[1]["fat_bottom"]
                for s in range(6)} & set(bodies)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["images"] == 12 and meta["unlabelled_images"] == 6
    assert sum(meta["unlabelled_hidden_classes"].values()) == 6
    assert "--unlabelled-subjects 6" in meta["command"]
    # the same seed writes the same files, bit for bit
    for r in labelled + unlabelled:
        assert (out / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()
    assert [{**r, "seconds": 0} for r in runs[0]] == [{**r, "seconds": 0} for r in runs[1]]


@pytest.mark.slow
def test_pymust_image_is_bit_identical_for_a_seed():
    pytest.importorskip("pymust")
    label, body, lesion, seed = simulate.subject(0, simulate.LABELLED, "solid", 0, 1)
    first, mask = simulate.simulate(body, lesion, label, seed, pixels=16, density=0.25)
    again, _ = simulate.simulate(body, lesion, label, seed, pixels=16, density=0.25)
    assert first.shape == mask.shape == (16, 16) and first.tobytes() == again.tobytes()


@pytest.mark.slow
def test_simulated_cyst_is_dark_where_its_mask_is():
    pytest.importorskip("pymust")
    rng = np.random.default_rng(1)
    lesion = dict(simulate.lesion(rng, "cyst"), x=0.0, z=15e-3, a=4e-3, b=3.5e-3)
    image, mask = simulate.simulate(simulate.tissue(rng), lesion, "cyst", seed=3, pixels=48,
                                    density=0.6)
    assert image.shape == mask.shape == (48, 48) and image.dtype == np.uint8
    inside = mask > 0
    assert image[inside].mean() < 0.75 * image[~inside].mean()  # a -20 dB echo, plane-wave clutter
