"""``ingest``: every real ultrasound DICOM of pydicom / pydicom-data, and a corpus built here of
broken and awkward files: each bad one reported with its reason, each good one kept, no crash.
Also the cleaning (sector crop, text removal, colour), resume, shards, parallel runs, the CLI."""
import csv
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

import av  # noqa: E402  (the ingest requirements: in requirements-dev.txt, not optional here)
import cv2  # noqa: E402
import nibabel as nib  # noqa: E402
from PIL import Image  # noqa: E402

from usfmae_fast.cli import main  # noqa: E402
from usfmae_fast.data.ingest.clean import annotation_mask, clean_frame, find_sector  # noqa: E402
from usfmae_fast.data.ingest.dicom_frames import ultrasound_test_files  # noqa: E402
from usfmae_fast.data.ingest import (MANIFEST_COLUMNS, IngestError, ingest,  # noqa: E402
                                     run_parallel)

SIDE = 128  # small output images keep the tests fast


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _errors(out: Path) -> dict[str, str]:
    return {Path(r["source"]).name: r["reason"] for r in _csv(out / "errors.csv")}


def _fan(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A B-mode-like frame: speckle inside a fan-shaped sector on black, and the sector mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 20), (int(h * 0.85),) * 2, 0, 50, 130, 1, thickness=-1)
    speckle = cv2.GaussianBlur(rng.gamma(2.0, 35.0, (h, w)).astype(np.float32), (3, 3), 0)
    blobs = cv2.resize(rng.uniform(0.4, 1.6, (6, 8)).astype(np.float32), (w, h))
    img = np.clip(30 + speckle * blobs, 0, 230).astype(np.uint8)
    return img * mask, mask.astype(bool)


# ---------------------------------------------------------------- real DICOMs


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    files = ultrasound_test_files()
    if not files:
        pytest.skip("pydicom-data is not installed: no ultrasound test files")
    out = tmp_path_factory.mktemp("real")
    summary = ingest(files, out, workers=1, max_side=SIDE)
    headers = {str(p.absolute()): pydicom.dcmread(p, stop_before_pixels=True) for p in files}
    return out, summary, headers


def _by_name(headers, rows, name):
    sources = [s for s in headers if Path(s).name == name]
    if not sources:
        pytest.skip(f"pydicom-data lacks {name}")
    return sources[0], [r for r in rows if r["source"] == sources[0]]


def test_real_dicoms_every_frame_read_and_accounted_for(real):
    out, summary, headers = real
    expected = {src: int(ds.get("NumberOfFrames", 1) or 1) for src, ds in headers.items()}
    assert max(expected.values()) == 120 and len(headers) >= 16  # several vendors, a long cine
    done = {r["source"]: r for r in _csv(out / "done.csv")}
    assert {src: int(r["frames_read"]) for src, r in done.items()} == expected
    assert summary["errors"] == 0 and _csv(out / "errors.csv") == []
    assert summary["files"] == summary["files_ok"] == len(headers)
    assert summary["frames_read"] == sum(expected.values())
    assert summary["frames_read"] == (summary["frames_written"] + summary["empty_frames"]
                                      + summary["exact_duplicates"] + summary["near_duplicates"])
    assert summary["duplicates_removed"] == summary["exact_duplicates"] + summary["near_duplicates"]
    rows = _csv(out / "manifest.csv")
    assert len(rows) == summary["frames_written"] == summary["manifest_rows"]
    per_source = Counter(r["source"] for r in rows)
    assert {s: int(r["frames_written"]) for s, r in done.items()} == {s: per_source[s] for s in done}
    assert json.loads((out / "summary.json").read_text()) == summary


def test_real_manifest_is_complete_and_images_are_real(real):
    out, _, headers = real
    rows = _csv(out / "manifest.csv")
    assert rows and list(rows[0]) == MANIFEST_COLUMNS
    assert len({r["content_hash"] for r in rows}) == len(rows)
    for r in rows:
        ds = headers[r["source"]]
        assert r["kind"] == "dicom" and r["modality"] == "US"
        assert r["vendor"] and r["vendor"] == str(ds.get("Manufacturer"))
        for column, keyword in (("patient_id", "PatientID"), ("study_uid", "StudyInstanceUID"),
                                ("series_uid", "SeriesInstanceUID"), ("sop_uid", "SOPInstanceUID")):
            assert r[column] == str(ds.get(keyword, ""))
        assert r["study_uid"] and r["series_uid"]  # every one of these files has them
        assert 0 <= int(r["frame"]) < int(ds.get("NumberOfFrames", 1) or 1)
        w, h = int(r["orig_width"]), int(r["orig_height"])
        assert (w, h) == (ds.Columns, ds.Rows)
        x0, y0, x1, y1 = (int(r[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        img = cv2.imread(str(out / r["path"]), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.dtype == np.uint8
        assert img.shape == (int(r["height"]), int(r["width"])) and r["channels"] == "1"
        assert max(img.shape) == min(SIDE, max(x1 - x0, y1 - y0))
        assert img.max() > img.min(), r["path"]


def test_real_crops_follow_the_regions_or_the_sector(real):
    out, _, headers = real
    rows = _csv(out / "manifest.csv")
    # the region (14, 38)-(1010, 758), inclusive, is the crop
    _, (philips,) = _by_name(headers, rows, "JPGLosslessP14SV1_1s_1f_8b.dcm")
    assert philips["crop_source"] == "dicom_regions"
    assert [int(philips[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1")] == [14, 38, 1011, 759]
    # its settings text sits left of the fan inside the region: blacked out in the image
    raw = pydicom.dcmread(_by_name(headers, rows, "JPGLosslessP14SV1_1s_1f_8b.dcm")[0]).pixel_array
    assert (raw[38:200, 14:150] > 128).sum() > 100  # the text is there in the source...
    img = cv2.imread(str(out / philips["path"]), cv2.IMREAD_UNCHANGED)
    sy, sx = img.shape[0] / 721, img.shape[1] / 997
    assert img[:int(162 * sy), :int(136 * sx)].max() == 0  # ...and gone from the output
    # regions written for the uncropped original overshoot this 350-row copy: found instead
    _, (palette,) = _by_name(headers, rows, "examples_palette.dcm")
    assert palette["crop_source"] != "dicom_regions"
    # no regions: the text bands above and below the GE image are cropped away
    ge = [r for r in rows if Path(r["source"]).name.startswith("US1_")]  # one image, 4 syntaxes
    assert ge and all(r["crop_source"] == "detected" and int(r["crop_y0"]) > 60
                      and int(r["crop_y1"]) < 400 for r in ge)


def test_real_duplicates_exact_across_files_near_within_a_cine(real):
    out, summary, headers = real
    rows = _csv(out / "manifest.csv")
    done = {Path(r["source"]).name: r for r in _csv(out / "done.csv")}
    # the same image stored with other transfer syntaxes: exact duplicates of OBXXXX1A.dcm
    for name in ("OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"):
        if name in done:
            assert done[name]["frames_read"] == "1" and done[name]["frames_written"] == "0"
    assert summary["exact_duplicates"] >= 5
    _, cine = _by_name(headers, rows, "color3d_jpeg_baseline.dcm")
    assert 2 <= len(cine) < 60 and summary["near_duplicates"] > 60  # a beating heart repeats
    assert [int(r["frame"]) for r in cine] == sorted(int(r["frame"]) for r in cine)


# ---------------------------------------------------------------- cleaning


def test_sector_crop_and_text_removal_on_a_synthetic_frame():
    img, fan = _fan(300, 400, seed=0)
    marked = img.copy()
    # settings in the corners of the sector's bounding box, outside the fan; gray ones too
    cv2.putText(marked, "GAIN 60", (45, 55), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1)
    cv2.putText(marked, "TIS 0.4", (280, 55), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 190, 1)
    cv2.putText(marked, "12cm", (4, 290), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1)  # outside the box
    cv2.drawMarker(marked, (200, 150), 255, cv2.MARKER_CROSS, 12, 1)  # calipers on tissue
    cv2.drawMarker(marked, (230, 200), 255, cv2.MARKER_CROSS, 12, 1)
    cv2.line(marked, (200, 150), (230, 200), 255, 1)

    out, box, source = clean_frame(marked, max_side=400)
    ref, ref_box, _ = clean_frame(img, max_side=400)
    ys, xs = np.nonzero(fan)
    assert source == "detected" and box == ref_box
    assert np.abs(np.array(box) - [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).max() <= 6
    x0, y0, x1, y1 = box
    drawn = (marked != img)[y0:y1, x0:x1]
    inside = drawn & fan[y0:y1, x0:x1]
    assert inside.sum() > 50 and (drawn & ~fan[y0:y1, x0:x1]).sum() > 100
    # the marks are gone: where they were, the output is near the unmarked frame...
    assert np.mean(out[drawn] >= 250) < 0.02
    assert np.abs(out[inside].astype(int) - ref[inside]).mean() < 0.5 * np.abs(
        marked[y0:y1, x0:x1][inside].astype(int) - ref[inside]).mean()
    assert out[drawn & ~fan[y0:y1, x0:x1]].max() == 0
    # ...and the rest of the sector is untouched
    far = ~cv2.dilate(drawn.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.mean(out[far] == ref[far]) > 0.98


def test_gray_text_is_a_mark_on_black_but_not_over_tissue():
    img, fan = _fan(200, 260, seed=4)
    canvas = np.zeros((200, 520), np.uint8)
    canvas[:, 260:] = img
    for x in (20, 300):  # the same gray label beside the image and over the tissue
        cv2.putText(canvas, "C5-1 16cm", (x, 140), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 170, 1)
    text = canvas == 170
    marks = annotation_mask(canvas, gray_out=True) > 0
    assert marks[:, :260][text[:, :260]].mean() > 0.9  # on black: any clear stroke
    over = text[:, 260:] & fan
    assert marks[:, 260:][over].mean() < 0.3  # over tissue only near-white strokes count
    assert marks[:, 260:][fan & ~text[:, 260:]].mean() < 0.02  # speckle is not text


def test_colour_flow_kept_on_request_and_dual_views_both_kept():
    gray, fan = _fan(200, 260, seed=1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    cv2.circle(rgb, (130, 110), 18, (200, 30, 30), -1)  # colour Doppler flow
    cv2.line(rgb, (60, 150), (200, 150), (255, 255, 255), 1)  # a white measurement line
    out, _, _ = clean_frame(rgb, max_side=260, keep_color=True)
    assert out.ndim == 3
    chroma = out.max(axis=2).astype(int) - out.min(axis=2)
    assert (chroma > 100).sum() > 0.8 * np.pi * 18 ** 2  # the flow is still red
    assert np.mean(out.min(axis=2) >= 250) < 0.001  # the white line is gone
    assert clean_frame(rgb, max_side=260)[0].ndim == 2  # gray by default

    left, _ = _fan(200, 200, seed=2)
    right, _ = _fan(200, 200, seed=3)
    dual = np.hstack([left, np.zeros((200, 40), np.uint8), right])
    box, hulls = find_sector(dual)
    assert len(hulls) == 2 and box[0] < 40 and box[2] > 400
    out, _, _ = clean_frame(dual, max_side=440)
    half = out.shape[1] // 2
    assert out[:, :half].mean() > 10 and out[:, half:].mean() > 10


# ---------------------------------------------------------------- a corpus of awkward files


def _png(img) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _dicom(path: Path, frames: np.ndarray, pixels: bool = True) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US multi-frame
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer, ds.PatientID = "US", "Synthetic", "P001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    n, rows, cols = frames.shape
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = rows, cols, 1, n
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType = 1, 1
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 8, 6
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 9, rows - 7
    ds.SequenceOfUltrasoundRegions = [region]
    if pixels:
        ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _video(path: Path, codec: str, scenes: list[np.ndarray], repeat: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = scenes[0].shape
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for scene in scenes:
            for _ in range(repeat):
                frame = av.VideoFrame.from_ndarray(np.repeat(scene[..., None], 3, 2), format="rgb24")
                container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``(folder, bad names -> words their reason must hold, good names)``."""
    root = tmp_path_factory.mktemp("corpus")
    fans = [_fan(96, 128, seed) for seed in range(10, 30)]
    good_jpeg = cv2.imencode(".jpg", fans[0][0])[1].tobytes()
    good_png = _png(fans[1][0])

    (root / "empty.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good_jpeg[:len(good_jpeg) // 2])
    (root / "truncated.png").write_bytes(good_png[:len(good_png) // 2])
    (root / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    _dicom(root / "no_pixels.dcm", fans[2][0][None], pixels=False)
    (root / "notes.txt").write_text("scanned by Dr X, probe C5-1\n")
    (root / "broken.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b" + np.random.default_rng(2).bytes(512))
    bad = {"empty.png": ["empty file"], "truncated.jpg": ["decode"], "truncated.png": ["decode"],
           "random.dcm": ["not a readable DICOM"], "no_pixels.dcm": ["no pixel data"],
           "notes.txt": ["not a DICOM, NIfTI, image or video"], "broken.mp4": ["video"],
           "broken.nii.gz": ["NIfTI"]}

    (root / "scan.jpg").write_bytes(good_jpeg)
    (root / "scan.png").write_bytes(good_png)
    cv2.imwrite(str(root / "scan.bmp"), fans[3][0])
    cv2.imwrite(str(root / "gray16.png"), fans[4][0].astype(np.uint16) * 16)  # 12 bits in 16
    Image.fromarray(fans[5][0].astype(np.uint16) * 257).save(root / "gray16.tif")
    rgba = np.dstack([np.repeat(fans[6][0][..., None], 3, 2), np.full((96, 128), 255, np.uint8)])
    rgba[:, 100:, 3] = 0  # transparent strip, white underneath
    rgba[:, 100:, :3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(fans[7][0]).convert("P").save(root / "palette.png")
    huge = np.zeros((10000, 10000), np.uint8)
    cv2.ellipse(huge, (5000, 500), (8500, 8500), 0, 50, 130, 120, thickness=-1)
    cv2.circle(huge, (5000, 5000), 1500, 200, -1)
    cv2.imwrite(str(root / "huge.png"), huge)
    volume = np.stack([fans[8 + k][0] if 0 < k < 5 else np.zeros((96, 128), np.uint8)
                       for k in range(6)], axis=-1).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "volume.nii.gz")
    _video(root / "cine.mp4", "mpeg4", [fans[13][0], fans[14][0]], repeat=6)
    _video(root / "cine.avi", "mjpeg", [fans[15][0], fans[16][0], fans[17][0]], repeat=2)
    (root / "series").mkdir()
    _dicom(root / "series" / "IM0001", np.stack([fans[k][0] for k in (18, 19, 0)]))  # no suffix
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: not a source at all
    good = ["scan.jpg", "scan.png", "scan.bmp", "gray16.png", "gray16.tif", "rgba.png",
            "palette.png", "huge.png", "volume.nii.gz", "cine.mp4", "cine.avi", "IM0001"]
    return root, bad, good


@pytest.fixture(scope="module")
def corpus_run(corpus, tmp_path_factory):
    root, _, _ = corpus
    out = tmp_path_factory.mktemp("corpus_out")
    summary = ingest([root, root / "missing.png"], out, workers=1, max_side=SIDE, frame_stride=2)
    return out, summary


def test_corpus_every_bad_file_reported_with_its_reason(corpus, corpus_run):
    root, bad, good = corpus
    out, summary = corpus_run
    errors = _errors(out)
    assert set(errors) == set(bad) | {"missing.png"}
    for name, words in bad.items():
        reason = errors[name]
        assert reason.startswith(str(root / name)), reason  # names the file...
        assert all(w in reason for w in words), reason      # ...and why
    assert "no such file" in errors["missing.png"]
    assert summary["errors"] == len(bad) + 1 and summary["files"] == len(bad) + len(good)


def test_corpus_every_good_file_kept(corpus, corpus_run):
    root, _, good = corpus
    out, summary = corpus_run
    rows = _csv(out / "manifest.csv")
    by_name = {}
    for r in rows:
        by_name.setdefault(Path(r["source"]).name, []).append(r)
        img = cv2.imread(str(out / r["path"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (int(r["height"]), int(r["width"])) and max(img.shape) <= SIDE
        assert img.dtype == np.uint8 and img.max() > img.min()
    assert sorted(by_name) == sorted(good) and summary["files_ok"] == len(good)

    (big,) = by_name["huge.png"]
    assert (big["orig_width"], big["orig_height"]) == ("10000", "10000")
    assert big["crop_source"] == "detected" and max(int(big["width"]), int(big["height"])) == SIDE
    g16 = cv2.imread(str(out / by_name["gray16.png"][0]["path"]), cv2.IMREAD_UNCHANGED)
    assert g16.max() >= 150  # 12 bits in a 16-bit PNG: stretched (divided by 256: under 15)
    rgba = by_name["rgba.png"][0]
    assert rgba["channels"] == "1" and int(rgba["crop_x1"]) <= 102  # the transparent strip is black
    volume = by_name["volume.nii.gz"]
    assert [int(r["frame"]) for r in volume] == [1, 2, 3, 4]  # empty slices 0 and 5 dropped
    assert (volume[0]["orig_width"], volume[0]["orig_height"]) == ("96", "128")  # rotated for display
    assert summary["empty_frames"] == 2
    # stride 2: frames 0, 2, 4 show scene 1 and 6, 8, 10 scene 2 -> one of each kept
    assert [int(r["frame"]) for r in by_name["cine.mp4"]] == [0, 6]
    assert [int(r["frame"]) for r in by_name["cine.avi"]] == [0, 2, 4]
    dicom = by_name["IM0001"]
    assert [int(r["frame"]) for r in dicom] == [0, 2]
    assert all(r["patient_id"] == "P001" and r["vendor"] == "Synthetic" and r["kind"] == "dicom"
               and r["crop_source"] == "dicom_regions" for r in dicom)
    assert [int(dicom[0][k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1")] == [8, 6, 120, 90]
    done = {Path(r["source"]).name: int(r["frames_read"]) for r in _csv(out / "done.csv")}
    assert done["cine.mp4"] == 6 and done["cine.avi"] == 3 and done["IM0001"] == 2


def test_frames_over_the_pixel_limit_are_refused_before_decoding(corpus, tmp_path):
    root, _, _ = corpus
    summary = ingest([root / "huge.png", root / "scan.png"], tmp_path, workers=1, max_side=SIDE,
                     max_pixels=10_000_000)
    assert summary["errors"] == 1 and summary["files_ok"] == 1
    reason = _errors(tmp_path)["huge.png"]
    assert "10000x10000" in reason and "max_pixels" in reason


def test_parallel_run_matches_the_serial_one(corpus, corpus_run, tmp_path):
    root, bad, good = corpus
    out, _ = corpus_run
    names = [n for n in list(bad) + good if n not in ("huge.png", "IM0001")]
    summary = ingest([root / n for n in names], tmp_path, workers=2, max_side=SIDE, frame_stride=2)
    assert summary["errors"] == len(bad)
    serial = {(r["source"], r["frame"]): r["content_hash"] for r in _csv(out / "manifest.csv")
              if Path(r["source"]).name in names}
    assert {(r["source"], r["frame"]): r["content_hash"]
            for r in _csv(tmp_path / "manifest.csv")} == serial
    assert _errors(tmp_path) == {n: r for n, r in _errors(out).items() if n in names}


def _die_on_boom(path, options):
    if path == "boom":
        os._exit(3)  # what a segfaulting decoder does to its process
    return {"source": path, "error": None}


def test_a_crashing_worker_costs_only_its_own_file():
    results = list(run_parallel(_die_on_boom, ["a", "boom", "c", "d"], None, workers=2))
    assert [r["source"] for r in results] == ["a", "boom", "c", "d"]
    assert [r["error"] is None for r in results] == [True, False, True, True]
    assert "boom" in results[1]["error"] and "died" in results[1]["error"]


# ---------------------------------------------------------------- resume, strict, CLI, shards


def test_rerun_resumes_and_redoes_changed_and_failed_files(corpus, tmp_path):
    root, _, _ = corpus
    src = tmp_path / "src"
    src.mkdir()
    for name in ("scan.png", "scan.bmp", "notes.txt", "cine.avi"):
        (src / name).write_bytes((root / name).read_bytes())
    out = tmp_path / "out"
    first = ingest(src, out, workers=1, max_side=SIDE)
    assert (first["files_ok"], first["errors"], first["skipped_done"]) == (3, 1, 0)
    manifest = (out / "manifest.csv").read_text()

    again = ingest(src, out, workers=1, max_side=SIDE)
    assert (again["files_ok"], again["errors"], again["skipped_done"]) == (0, 1, 3)
    assert (out / "manifest.csv").read_text() == manifest and again["manifest_rows"] == first["manifest_rows"]

    # a run killed between writing a file's rows and marking it done leaves stray rows
    with open(out / "manifest.csv", "a") as f:
        f.write("images/xx/stray.png," + str(src / "gone.png") + ",image,0" + "," * 18 + "\n")
    img, _ = _fan(96, 128, seed=99)
    cv2.imwrite(str(src / "scan.bmp"), img)  # changed: read again
    os.utime(src / "scan.bmp", ns=(1, 1))
    third = ingest(src, out, workers=1, max_side=SIDE)
    assert (third["files_ok"], third["skipped_done"]) == (1, 2)
    rows = _csv(out / "manifest.csv")
    assert "stray.png" not in {Path(r["path"]).name for r in rows}
    assert len(rows) == first["manifest_rows"] and all((out / r["path"]).is_file() for r in rows)

    with pytest.raises(ValueError, match="other options"):
        ingest(src, out, workers=1, max_side=SIDE * 2)


def test_strict_fails_the_run_after_writing_everything(corpus, tmp_path):
    root, _, _ = corpus
    with pytest.raises(IngestError, match="errors.csv"):
        ingest([root / "scan.png", root / "notes.txt"], tmp_path, workers=1, max_side=SIDE,
               strict=True)
    assert len(_csv(tmp_path / "manifest.csv")) == 1 and len(_csv(tmp_path / "errors.csv")) == 1


def test_cli_ingest_exit_codes(corpus, tmp_path, capsys):
    root, _, _ = corpus
    args = ["ingest", str(root / "scan.png"), str(root / "notes.txt"), "--max-side", "64",
            "--format", "jpeg", "--quiet", "--workers", "1"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames_written"] == 1 and summary["errors"] == 1
    assert main(args + ["--out", str(tmp_path / "b"), "--strict"]) == 1
    assert "notes.txt" not in capsys.readouterr().out
    (row,) = _csv(tmp_path / "b" / "manifest.csv")
    assert row["path"].endswith(".jpg") and (tmp_path / "b" / row["path"]).is_file()


def test_webdataset_shards_hold_every_image_and_its_row(corpus, tmp_path):
    root, _, _ = corpus
    files = [root / n for n in ("scan.jpg", "scan.png", "scan.bmp", "palette.png", "cine.avi")]
    summary = ingest(files, tmp_path, workers=1, max_side=SIDE, shard_size=3)
    rows = _csv(tmp_path / "manifest.csv")
    assert summary["shards"] == -(-len(rows) // 3) == len(list((tmp_path / "shards").glob("*.tar")))
    members = {}
    for shard in sorted((tmp_path / "shards").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    for r in rows:
        key = Path(r["path"]).stem
        assert "." not in key
        assert members[f"{key}.png"] == (tmp_path / r["path"]).read_bytes()
        meta = json.loads(members[f"{key}.json"])
        assert meta["content_hash"] == r["content_hash"] and meta["width"] == int(r["width"])
    assert len(members) == 2 * len(rows)

    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    @dali.pipeline_def(batch_size=len(rows), num_threads=1, device_id=None)
    def read_shards():
        images, meta = fn.readers.webdataset(
            paths=[str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))],
            ext=["png", "json"], missing_component_behavior="error")
        return fn.decoders.image(images, device="cpu", output_type=dali.types.GRAY), meta

    pipe = read_shards()
    pipe.build()
    images, metas = pipe.run()
    for i in range(len(rows)):
        meta = json.loads(bytes(np.array(metas.at(i))).decode())
        assert np.array(images.at(i)).shape[:2] == (meta["height"], meta["width"])


def test_gray_png_is_ingested(tmp_path):
    """8-bit gray PNGs decode to arrays PIL owns (read-only): cleaning must get its own copy."""
    rng = np.random.default_rng()
    img = rng.integers(0, 200, size=(96, 120), dtype=np.uint8)
    Image.fromarray(img, mode="L").save(tmp_path / "gray.png")
    summary = ingest([tmp_path / "gray.png"], tmp_path / "out", workers=1, progress=False,
                     crop=False, remove_text=False)
    assert summary["files_ok"] == 1 and summary["frames_written"] == 1
    row = _csv(tmp_path / "out" / "manifest.csv")[0]
    written = np.asarray(Image.open(tmp_path / "out" / row["path"]))
    assert written.shape == img.shape and np.array_equal(written, img)
