"""A labelled B-mode set simulated with the MUST ultrasound simulator (``pymust``), seeded, with
the lesion masks beside the images: the demo's fine-tuning and Score-CAM data.

    OMP_NUM_THREADS=1 python -m usfmae_fast.data.simulate --out usfmae_fast/demo_data/bmode_sim \
        --subjects 50 --views 2 --seed 0 --workers 2      # the committed set, ~45 min on 2 cores

Three classes, the same tissue model under each:

- ``normal``: layered soft tissue (a hypoechoic subcutaneous band, a bright fascia line,
  smooth random echogenicity variations) of fully developed speckle;
- ``cyst``: plus an anechoic ellipse (reflectivity 0) with posterior acoustic enhancement;
- ``solid``: plus a hypoechoic ellipse with a lobulated border (reflectivity -12 dB) casting a
  posterior acoustic shadow (-14 dB behind it, fading with depth).

Physics (``PHYSICS`` below, written to ``metadata.json``): the 7.6 MHz linear array ``L11-5v``
(pitch 0.3 mm, 77 % bandwidth; its central 64 elements), speed of sound 1540 m/s, scatterers
drawn by ``genscat`` with a mean nearest-neighbour distance of one wavelength (0.2 mm) in a
20 x 20 mm region from 5 mm depth, Rayleigh-distributed reflection coefficients
scaled by the echogenicity map, RF by ``simus``, I/Q demodulation by ``rf2iq``, delay-and-sum
beamforming by ``dasmtx`` onto a 128 x 128 grid (three plane waves at -8, 0, +8 degrees,
compounded; one sub-element per element in ``simus``), log compression by ``bmode`` (40 dB).
Each subject is imaged twice (two scatterer realisations, the lesion shifted by up to 1 mm):
``labels.csv`` carries ``patient_id`` so cross-validation can keep a subject in one fold.
About 9 s per image per core (17 s each with 2 workers on a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = ("normal", "cyst", "solid")
PHYSICS = {
    "probe": "L11-5v", "center_frequency_hz": 7.6e6, "elements": 64, "pitch_m": 3e-4,
    "bandwidth_percent": 77, "speed_of_sound_m_s": 1540.0, "element_splitting": 1, "transmit_angles_deg": [-8.0, 0.0, 8.0],
    "region_width_m": 20e-3, "depth_range_m": [5e-3, 25e-3],
    "scatterer_mean_distance_wavelengths": 1.0, "image_pixels": [128, 128],
    "dynamic_range_db": 40.0, "solid_lesion_db": -12.0, "shadow_db": -14.0,
    "cyst_enhancement_db": 4.0, "views_per_subject": 2, "simulator": "pymust (MUST)",
}
WIDTH, (DEPTH0, DEPTH1) = PHYSICS["region_width_m"], PHYSICS["depth_range_m"]


def _db(value: float) -> float:
    return 10 ** (value / 20)


def tissue(rng: np.random.Generator) -> dict:
    """A subject's background: band depths and smooth echogenicity variation (shared by views)."""
    return {"fat_bottom": rng.uniform(6e-3, 9e-3), "fat_db": rng.uniform(-8, -4),
            "fascia_width": rng.uniform(0.3e-3, 0.6e-3), "fascia_db": rng.uniform(4, 8),
            "waves": rng.normal(0, 1.5, size=(4, 3)), "tilt": rng.uniform(-0.08, 0.08)}


def lesion(rng: np.random.Generator, label: str) -> dict | None:
    if label == "normal":
        return None
    return {"x": rng.uniform(-5e-3, 5e-3), "z": rng.uniform(12e-3, 17e-3),
            "a": rng.uniform(2e-3, 4e-3), "b": rng.uniform(1.6e-3, 3.2e-3),
            "angle": rng.uniform(-0.5, 0.5),
            "lobes": rng.uniform(0.0, 0.15, size=3) if label == "solid" else np.zeros(3),
            "phases": rng.uniform(0, 2 * np.pi, size=3)}


def inside(lesion_: dict, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Points inside the (lobulated) ellipse."""
    dx, dz = x - lesion_["x"], z - lesion_["z"]
    c, s = np.cos(lesion_["angle"]), np.sin(lesion_["angle"])
    u, v = (c * dx + s * dz) / lesion_["a"], (-s * dx + c * dz) / lesion_["b"]
    theta = np.arctan2(v, u)
    radius = 1 + sum(amp * np.cos((k + 3) * theta + ph) for k, (amp, ph)
                     in enumerate(zip(lesion_["lobes"], lesion_["phases"])))
    return np.hypot(u, v) < radius


def echogenicity(x: np.ndarray, z: np.ndarray, body: dict, lesion_: dict | None,
                 label: str) -> np.ndarray:
    """Mean reflection amplitude at scatterer positions (linear scale)."""
    ux, uz = x / WIDTH, (z - DEPTH0) / (DEPTH1 - DEPTH0)
    db = sum(w[0] * np.sin(np.pi * ((i + 1) * ux + w[1])) * np.cos(np.pi * ((i + 1) * uz + w[2]))
             for i, w in enumerate(body["waves"]))
    boundary = body["fat_bottom"] + body["tilt"] * x
    db = db + np.where(z < boundary, body["fat_db"], 0.0)
    db = db + np.where(np.abs(z - boundary) < body["fascia_width"], body["fascia_db"], 0.0)
    amp = 10 ** (db / 20)
    if lesion_ is None:
        return amp
    mask = inside(lesion_, x, z)
    half = max(lesion_["a"], lesion_["b"]) * 0.9  # the column behind the lesion
    behind = (np.abs(x - lesion_["x"]) < half) & (z > lesion_["z"]) & ~mask
    fade = np.clip(1 - (z - lesion_["z"]) / 15e-3, 0.3, 1.0)
    if label == "cyst":
        amp = np.where(behind, amp * _db(PHYSICS["cyst_enhancement_db"] * fade), amp)
        return np.where(mask, 0.0, amp)
    amp = np.where(behind, amp * _db(PHYSICS["shadow_db"] * fade), amp)
    return np.where(mask, amp * _db(PHYSICS["solid_lesion_db"]), amp)


def image_grid(pixels: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(-WIDTH / 2, WIDTH / 2, pixels)
    z = np.linspace(DEPTH0, DEPTH1, pixels)
    return np.meshgrid(x, z)


def simulate(body: dict, lesion_: dict | None, label: str, seed: int, pixels: int = 128,
             density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image (uint8 [pixels, pixels]) and its lesion mask (uint8, 255 = lesion)."""
    import pymust

    rng = np.random.default_rng(seed)
    np.random.seed(seed % 2**32)  # genscat draws from numpy's global generator
    param = pymust.getparam(PHYSICS["probe"])
    param.Nelements = PHYSICS["elements"]
    options = pymust.utils.Options()
    options.ElementSplitting = PHYSICS["element_splitting"]  # 2.7x faster than pymust's default
    wavelength = PHYSICS["speed_of_sound_m_s"] / param.fc
    xs, _, zs, _ = pymust.genscat(np.array([WIDTH, DEPTH1 - DEPTH0]),
                                  wavelength * PHYSICS["scatterer_mean_distance_wavelengths"]
                                  / density)
    zs = zs + DEPTH0
    rc = rng.rayleigh(1.0, size=xs.shape) * echogenicity(xs, zs, body, lesion_, label)
    gx, gz = image_grid(pixels)
    beamformed = 0
    for tilt in np.deg2rad(PHYSICS["transmit_angles_deg"]):
        delays = pymust.txdelay(param, float(tilt))
        rf, _ = pymust.simus(xs, zs, rc, delays, param, options)
        iq = pymust.rf2iq(rf, param.fs, param.fc)
        das = pymust.dasmtx(iq, gx, gz, delays, param)
        beamformed = beamformed + (das @ iq.flatten(order="F")).reshape(gx.shape, order="F")
    image = np.asarray(pymust.bmode(beamformed, PHYSICS["dynamic_range_db"]), dtype=np.uint8)
    mask = np.zeros(gx.shape, np.uint8) if lesion_ is None else inside(lesion_, gx, gz) * 255
    return image, mask.astype(np.uint8)


def _job(args: tuple) -> dict:
    from PIL import Image

    out, label, subject, view, seed, pixels = args
    subject_rng = np.random.default_rng([seed, subject])
    body, lesion_ = tissue(subject_rng), lesion(subject_rng, label)
    view_rng = np.random.default_rng([seed, subject, view])
    if lesion_ is not None and view:
        lesion_ = {**lesion_, "x": lesion_["x"] + view_rng.uniform(-1e-3, 1e-3),
                   "z": lesion_["z"] + view_rng.uniform(-1e-3, 1e-3)}
    started = time.perf_counter()
    image, mask = simulate(body, lesion_, label, int(view_rng.integers(2**31)), pixels)
    name = f"{label}/{label}_s{subject:03d}_v{view}.png"
    for folder, array in (("images", image), ("masks", mask)):
        path = Path(out) / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, optimize=True)
    return {"path": f"images/{name}", "label": label, "patient_id": f"{label}_s{subject:03d}",
            "mask": f"masks/{name}", "seconds": round(time.perf_counter() - started, 2)}


def generate(out, subjects: int = 50, views: int = 2, seed: int = 0, pixels: int = 128,
             workers: int = 1) -> list[dict]:
    """Simulate ``subjects`` subjects per class, ``views`` images each; writes ``images/``,
    ``masks/``, ``labels.csv`` (path, label, patient_id, mask) and ``metadata.json``."""
    out = Path(out)
    jobs = [(str(out), label, s, v, seed, pixels) for label in CLASSES
            for s in range(subjects) for v in range(views)]
    with ProcessPoolExecutor(workers) as pool:
        rows = []
        for row in pool.map(_job, jobs):
            rows.append(row)
            print(f"[{len(rows)}/{len(jobs)}] {row['path']} ({row['seconds']} s)", flush=True)
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "patient_id", "mask"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    meta = {"physics": {**PHYSICS, "image_pixels": [pixels, pixels], "views_per_subject": views},
            "seed": seed, "subjects_per_class": subjects, "images": len(rows),
            "classes": list(CLASSES), "seconds_per_image": float(np.mean([r["seconds"] for r in rows])),
            "command": f"python -m usfmae_fast.data.simulate --out {out} --subjects {subjects} "
                       f"--views {views} --seed {seed} --pixels {pixels}"}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--subjects", type=int, default=50, help="subjects per class")
    p.add_argument("--views", type=int, default=2, help="images per subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    generate(a.out, a.subjects, a.views, a.seed, a.pixels, a.workers)


if __name__ == "__main__":
    main()
