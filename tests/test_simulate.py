"""The simulated B-mode set: the committed images are what the generator describes, and the
generator's physics makes the lesions it claims (a short simulation at low resolution)."""
import csv
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from usfmae_fast.data import simulate
from usfmae_fast.demo import DEMO_SET


def test_committed_set_is_complete_and_consistent():
    meta = json.loads((DEMO_SET / "metadata.json").read_text())
    with (DEMO_SET / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == meta["images"] >= 300
    assert Counter(r["label"] for r in rows) == {c: len(rows) // 3 for c in simulate.CLASSES}
    views = Counter(r["patient_id"] for r in rows)
    assert set(views.values()) == {meta["physics"]["views_per_subject"]}
    for r in rows:
        assert r["patient_id"].startswith(r["label"])  # a subject has one class
        with Image.open(DEMO_SET / r["path"]) as img, Image.open(DEMO_SET / r["mask"]) as mask:
            assert img.mode == "L" and img.size == mask.size == (128, 128)
            lesion = np.asarray(mask) > 0
        assert lesion.any() == (r["label"] != "normal"), r["path"]


def test_lesion_geometry_and_echogenicity():
    rng = np.random.default_rng()
    body = simulate.tissue(rng)
    for label in ("cyst", "solid"):
        lesion = simulate.lesion(rng, label)
        x, z = simulate.image_grid(64)
        inside = simulate.inside(lesion, x, z)
        assert inside[np.abs(z - lesion["z"]).argmin(axis=0)[0], :].any()
        amp = simulate.echogenicity(x, z, body, lesion, label)
        if label == "cyst":
            assert (amp[inside] == 0).all()
        else:
            assert 0 < amp[inside].mean() < 0.5 * amp[~inside].mean()
    assert simulate.lesion(rng, "normal") is None


@pytest.mark.slow
def test_simulated_cyst_is_dark_where_its_mask_is():
    pytest.importorskip("pymust")
    rng = np.random.default_rng(1)
    lesion = dict(simulate.lesion(rng, "cyst"), x=0.0, z=15e-3, a=4e-3, b=3.5e-3)
    image, mask = simulate.simulate(simulate.tissue(rng), lesion, "cyst", seed=3, pixels=48,
                                    density=0.6)
    assert image.shape == mask.shape == (48, 48) and image.dtype == np.uint8
    inside = mask > 0
    assert image[inside].mean() < 0.6 * image[~inside].mean()
