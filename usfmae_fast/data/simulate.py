"""A labelled B-mode set simulated with the MUST ultrasound simulator (``pymust``), seeded, with
the lesion masks and the posterior shadow / enhancement masks beside the images, plus images of
further, never-labelled subjects: the demo's fine-tuning, Score-CAM and pretraining data.

    OMP_NUM_THREADS=1 python -m usfmae_fast.data.simulate --out usfmae_fast/demo_data/bmode_sim \
        --subjects 50 --views 2 --unlabelled-subjects 60 --seed 0 --workers 1

Three classes, the same tissue model under each, made hard on purpose (subtle, small lesions, so
that a small CNN does not saturate at AUC 1.0; the numbers are ``PHYSICS`` below):

- ``normal``: layered soft tissue (a hypoechoic subcutaneous band, a bright fascia line,
  smooth random echogenicity variations of a few dB) of fully developed speckle;
- ``cyst``: plus a small ellipse that is not perfectly anechoic (a weak internal echo,
  ``cyst_interior_db`` = -20 dB) with a weak posterior acoustic enhancement
  (``cyst_enhancement_db`` = +2 dB);
- ``solid``: plus a small hypoechoic ellipse with a lobulated border (``solid_lesion_db`` =
  -6 dB) casting a weak posterior acoustic shadow (``shadow_db`` = -6 dB).

Lesion semi-axes are drawn from ``lesion_semi_axes_m`` (1.3-2.6 mm by 1.1-2.1 mm, about 35 %
smaller than the first set's 2-4 by 1.6-3.2 mm). The shadow / enhancement is applied in the
column behind the lesion (``posterior_region``: within 0.9 of the larger semi-axis of the
lesion's centre laterally, deeper than its centre, outside it), fading linearly with depth to
30 % of its dB value 15 mm below the centre.

Physics (``PHYSICS``, written to ``metadata.json``): the 7.6 MHz linear array ``L11-5v``
(pitch 0.3 mm, 77 % bandwidth; its central 64 elements), speed of sound 1540 m/s, scatterers
drawn by ``genscat`` with a mean nearest-neighbour distance of half a wavelength (0.1 mm;
about 15,600 scatterers, 39 per mm^2) in a 20 x 20 mm region from 5 mm depth,
Rayleigh-distributed reflection coefficients scaled by the echogenicity map, RF by ``simus``
(one plane wave at 0 degrees; one sub-element per element), I/Q demodulation by ``rf2iq``,
delay-and-sum beamforming by ``dasmtx`` onto a 128 x 128 grid, log compression by ``bmode``
(40 dB).

Speckle and cost (measured, one BLAS thread, a 2-core machine at load ~4, homogeneous tissue,
each depth row normalised; fully developed speckle has a log-envelope SD of 5.57 dB and an
envelope SNR of 1.91): the first set's three compounded plane waves with one-wavelength spacing
gave 7.0 dB / 1.29 (too few scatterers per resolution cell: not fully developed) at 3.8 s per
image; three waves at half-wavelength spacing 5.8 dB / 1.78 at 20 s; one wave at half-wavelength
spacing 5.6 dB / 1.83 at 4.3 s, the choice. The cost is ``simus`` (the scatterer count), hardly
the grid: with the first set's physics 4.1 s per image at 128 px, 3.6 s at 96 px, 3.2 s at
64 px, so the set keeps 128 px (``metadata.json`` records the generation's own
``seconds_per_image``).

Written to ``--out``:

- ``images/<class>/<class>_sNNN_vV.png``: each labelled subject imaged ``--views`` times (two
  scatterer realisations, the lesion shifted by up to 1 mm);
- ``masks/<class>/<same name>``: the lesion (255 inside; all zero for ``normal``);
- ``masks_shadow/<class>/<same name>``: the region where the shadow (``solid``) or the
  enhancement (``cyst``) is applied, clipped to the image (all zero for ``normal``);
- ``labels.csv``: ``path, label, patient_id, mask, shadow_mask`` of the labelled images only, so
  cross-validation can keep a subject in one fold;
- ``unlabelled/images/unlabelled_sNNN_vV.png`` (``--unlabelled-subjects``): further subjects,
  their class drawn at random, from a seed stream of their own (no subject, lesion or scatterer
  realisation coincides with a labelled one), subject ids ``unlabelled_sNNN`` disjoint from every
  labelled one; they are in no labels file and have no masks. ``unlabelled_audit.csv`` (``path,
  subject_id, hidden_class``) lists their hidden classes for auditing the pretraining pool only:
  it is not a label file and nothing should train on it;
- ``metadata.json``: physics, seed, counts, seconds per image and the command.

Seeds: a labelled image draws from ``[seed, 0, class index, subject, view]``, an unlabelled one
from ``[seed, 1, subject, view]`` (``subject``). The first set drew from ``[seed, subject]``, so
``normal_s007``, ``cyst_s007`` and ``solid_s007`` shared their tissue and scatterers, which a
patient-grouped split did not keep apart; every subject now has its own.
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
    "bandwidth_percent": 77, "speed_of_sound_m_s": 1540.0, "element_splitting": 1,
    "transmit_angles_deg": [0.0],
    "region_width_m": 20e-3, "depth_range_m": [5e-3, 25e-3],
    "scatterer_mean_distance_wavelengths": 0.5, "image_pixels": [128, 128],
    "dynamic_range_db": 40.0,
    "lesion_semi_axes_m": [[1.3e-3, 2.6e-3], [1.1e-3, 2.1e-3]],  # a (lateral-ish), b ranges
    "lesion_depth_m": [12e-3, 17e-3], "lesion_lateral_m": [-5e-3, 5e-3],
    "solid_lesion_db": -6.0, "shadow_db": -6.0,
    "cyst_interior_db": -20.0, "cyst_enhancement_db": 2.0,
    "posterior_half_width_of_semi_axis": 0.9, "posterior_fade_m": 15e-3, "posterior_fade_floor": 0.3,
    "views_per_subject": 2, "simulator": "pymust (MUST)",
}
WIDTH, (DEPTH0, DEPTH1) = PHYSICS["region_width_m"], PHYSICS["depth_range_m"]
LABELLED, UNLABELLED = 0, 1  # the second word of every seed key: the pools never share a stream


def _db(value) -> np.ndarray:
    return 10 ** (np.asarray(value) / 20)


def tissue(rng: np.random.Generator) -> dict:
    """A subject's background: band depths and smooth echogenicity variation (shared by views)."""
    return {"fat_bottom": rng.uniform(6e-3, 9e-3), "fat_db": rng.uniform(-8, -4),
            "fascia_width": rng.uniform(0.3e-3, 0.6e-3), "fascia_db": rng.uniform(4, 8),
            "waves": rng.normal(0, 1.5, size=(4, 3)), "tilt": rng.uniform(-0.08, 0.08)}


def lesion(rng: np.random.Generator, label: str) -> dict | None:
    if label == "normal":
        return None
    (a0, a1), (b0, b1) = PHYSICS["lesion_semi_axes_m"]
    return {"x": rng.uniform(*PHYSICS["lesion_lateral_m"]), "z": rng.uniform(*PHYSICS["lesion_depth_m"]),
            "a": rng.uniform(a0, a1), "b": rng.uniform(b0, b1),
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


def posterior_region(lesion_: dict, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The column behind the lesion where its shadow / enhancement is applied: laterally within
    ``posterior_half_width_of_semi_axis`` x the larger semi-axis of its centre, deeper than its
    centre, outside the lesion."""
    half = max(lesion_["a"], lesion_["b"]) * PHYSICS["posterior_half_width_of_semi_axis"]
    return (np.abs(x - lesion_["x"]) < half) & (z > lesion_["z"]) & ~inside(lesion_, x, z)


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
    mask, behind = inside(lesion_, x, z), posterior_region(lesion_, x, z)
    fade = np.clip(1 - (z - lesion_["z"]) / PHYSICS["posterior_fade_m"],
                   PHYSICS["posterior_fade_floor"], 1.0)
    posterior, interior = (("cyst_enhancement_db", "cyst_interior_db") if label == "cyst"
                           else ("shadow_db", "solid_lesion_db"))
    amp = np.where(behind, amp * _db(PHYSICS[posterior] * fade), amp)
    return np.where(mask, amp * _db(PHYSICS[interior]), amp)


def image_grid(pixels: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(-WIDTH / 2, WIDTH / 2, pixels)
    z = np.linspace(DEPTH0, DEPTH1, pixels)
    return np.meshgrid(x, z)


def masks(lesion_: dict | None, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """The lesion and posterior-region masks on the image grid (uint8, 255 inside)."""
    gx, gz = image_grid(pixels)
    if lesion_ is None:
        empty = np.zeros(gx.shape, np.uint8)
        return empty, empty.copy()
    return ((inside(lesion_, gx, gz) * 255).astype(np.uint8),
            (posterior_region(lesion_, gx, gz) * 255).astype(np.uint8))


def simulate(body: dict, lesion_: dict | None, label: str, seed: int, pixels: int = 128,
             density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode image (uint8 [pixels, pixels]) and its lesion mask (uint8, 255 = lesion)."""
    import pymust
    from threadpoolctl import threadpool_limits

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
    # one BLAS thread: on a shared 2-core machine more make simus several times slower
    with threadpool_limits(1):  # (threadpoolctl comes with scikit-learn)
        for tilt in np.deg2rad(PHYSICS["transmit_angles_deg"]):
            delays = pymust.txdelay(param, float(tilt))
            rf, _ = pymust.simus(xs, zs, rc, delays, param, options)
            iq = pymust.rf2iq(rf, param.fs, param.fc)
            das = pymust.dasmtx(iq, gx, gz, delays, param)
            beamformed = beamformed + (das @ iq.flatten(order="F")).reshape(gx.shape, order="F")
    image = np.asarray(pymust.bmode(beamformed, PHYSICS["dynamic_range_db"]), dtype=np.uint8)
    return image, masks(lesion_, pixels)[0]


def subject(seed: int, pool: int, label: str | None, index: int, view: int
            ) -> tuple[str, dict, dict | None, int]:
    """The class, tissue, lesion (shifted for views after the first) and scatterer seed of one
    image. Labelled subjects draw from ``[seed, LABELLED, class index, index]``; unlabelled
    ones from ``[seed, UNLABELLED, index]``, their class drawn first from that stream."""
    key = [seed, pool, CLASSES.index(label), index] if pool == LABELLED else [seed, pool, index]
    subject_rng = np.random.default_rng(key)
    if label is None:
        label = CLASSES[int(subject_rng.integers(len(CLASSES)))]
    body, lesion_ = tissue(subject_rng), lesion(subject_rng, label)
    view_rng = np.random.default_rng([*key, view])
    if lesion_ is not None and view:
        lesion_ = {**lesion_, "x": lesion_["x"] + view_rng.uniform(-1e-3, 1e-3),
                   "z": lesion_["z"] + view_rng.uniform(-1e-3, 1e-3)}
    return label, body, lesion_, int(view_rng.integers(2**31))


def _save(out: Path, relative: str, array: np.ndarray) -> None:
    from PIL import Image

    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=True)


def _job(args: tuple) -> dict:
    out, pool, label, index, view, seed, pixels = args
    out = Path(out)
    label, body, lesion_, view_seed = subject(seed, pool, label, index, view)
    started = time.perf_counter()
    image, _ = simulate(body, lesion_, label, view_seed, pixels)
    seconds = round(time.perf_counter() - started, 2)
    if pool == UNLABELLED:
        path = f"unlabelled/images/unlabelled_s{index:03d}_v{view}.png"
        _save(out, path, image)
        return {"path": path, "subject_id": f"unlabelled_s{index:03d}", "hidden_class": label,
                "seed": view_seed, "seconds": seconds}
    name = f"{label}/{label}_s{index:03d}_v{view}.png"
    lesion_mask, shadow_mask = masks(lesion_, pixels)
    for folder, array in (("images", image), ("masks", lesion_mask), ("masks_shadow", shadow_mask)):
        _save(out, f"{folder}/{name}", array)
    return {"path": f"images/{name}", "label": label, "patient_id": f"{label}_s{index:03d}",
            "mask": f"masks/{name}", "shadow_mask": f"masks_shadow/{name}", "seed": view_seed,
            "seconds": seconds}


class _InProcess:
    """One worker: the jobs run here, in order (no process to start, nothing to pickle)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def generate(out, subjects: int = 50, views: int = 2, seed: int = 0, pixels: int = 128,
             workers: int = 1, unlabelled_subjects: int = 0, unlabelled_views: int = 1,
             progress: bool = True) -> list[dict]:
    """Simulate ``subjects`` labelled subjects per class, ``views`` images each, and
    ``unlabelled_subjects`` further subjects of random class, ``unlabelled_views`` images each;
    writes the files the module docstring lists. Returns the labelled rows."""
    out = Path(out)
    jobs = [(str(out), LABELLED, label, s, v, seed, pixels) for label in CLASSES
            for s in range(subjects) for v in range(views)]
    jobs += [(str(out), UNLABELLED, None, s, v, seed, pixels) for s in range(unlabelled_subjects)
             for v in range(unlabelled_views)]
    started = time.perf_counter()
    results = []
    with ProcessPoolExecutor(workers) if workers > 1 else _InProcess() as pool:
        for row in pool.map(_job, jobs):
            results.append(row)
            if progress:
                print(f"[{len(results)}/{len(jobs)}] {row['path']} ({row['seconds']} s)", flush=True)
    rows = [r for r in results if "label" in r]
    unlabelled = [r for r in results if "hidden_class" in r]
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) != len(seeds):  # ~1e-6 odds over 2**31; then change --seed
        raise RuntimeError("two images drew the same scatterer seed")
    _write_csv(out / "labels.csv", rows, ["path", "label", "patient_id", "mask", "shadow_mask"])
    if unlabelled:
        _write_csv(out / "unlabelled_audit.csv", unlabelled, ["path", "subject_id", "hidden_class"])
    command = (f"OMP_NUM_THREADS=1 python -m usfmae_fast.data.simulate --out {out} "
               f"--subjects {subjects} --views {views} --seed {seed} --pixels {pixels} "
               f"--unlabelled-subjects {unlabelled_subjects} --unlabelled-views {unlabelled_views} "
               f"--workers {workers}")
    meta = {"physics": {**PHYSICS, "image_pixels": [pixels, pixels], "views_per_subject": views},
            "seed": seed, "subjects_per_class": subjects, "images": len(rows),
            "classes": list(CLASSES),
            "unlabelled_subjects": unlabelled_subjects, "unlabelled_views": unlabelled_views,
            "unlabelled_images": len(unlabelled),
            "unlabelled_hidden_classes": {c: sum(r["hidden_class"] == c for r in unlabelled)
                                          for c in CLASSES},
            "folders": {"images": "labelled images, images/<class>/",
                        "masks": "lesion masks (255 = lesion), same names under masks/",
                        "masks_shadow": "posterior shadow (solid) / enhancement (cyst) region "
                                        "masks, clipped to the image, same names",
                        "unlabelled": "unlabelled/images/: never-labelled subjects, no masks; "
                                      "unlabelled_audit.csv holds their hidden class for audit "
                                      "only (not labels)"},
            "seconds_per_image": round(float(np.mean([r["seconds"] for r in results])), 2),
            "workers": workers, "wall_seconds": round(time.perf_counter() - started, 1),
            "command": command}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--subjects", type=int, default=50, help="labelled subjects per class")
    p.add_argument("--views", type=int, default=2, help="images per labelled subject")
    p.add_argument("--unlabelled-subjects", type=int, default=0,
                   help="further subjects of random class, written to unlabelled/ without labels")
    p.add_argument("--unlabelled-views", type=int, default=1, help="images per unlabelled subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    generate(a.out, a.subjects, a.views, a.seed, a.pixels, a.workers, a.unlabelled_subjects,
             a.unlabelled_views)


if __name__ == "__main__":
    main()
