"""Real ultrasound DICOMs from pydicom-data -> 8-bit grayscale frames; bad files are skipped."""
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pydicom.data")

from usfmae_fast.data.ingest.dicom_frames import (DicomFrameError, load_frames,  # noqa: E402
                                           read_gray_frames, ultrasound_test_files)


@pytest.fixture(scope="module")
def us_files() -> dict[str, Path]:
    files = ultrasound_test_files()
    if not files:
        pytest.skip("pydicom-data is not installed: no ultrasound test files")
    return {f.name: f for f in files}


def test_finds_real_ultrasound_files_and_every_one_decodes(us_files):
    assert len(us_files) >= 1
    for path in us_files.values():
        assert pydicom.dcmread(path, stop_before_pixels=True).Modality == "US"
        frames = read_gray_frames(path, max_frames=2)
        assert 1 <= len(frames) <= 2, path.name
        for frame in frames:
            assert frame.ndim == 2 and frame.dtype == np.uint8, (path.name, frame.shape)
            assert min(frame.shape) >= 16 and frame.max() > frame.min(), path.name


def _need(us_files, *names):
    missing = [n for n in names if n not in us_files]
    if missing:
        pytest.skip(f"pydicom-data lacks {missing}")
    return [us_files[n] for n in names]


def test_colour_conversions_agree_across_encodings(us_files):
    # JPEG 2000 lossless YBR_RCT decodes to the same pixels as the uncompressed RGB file
    j2k, rgb = _need(us_files, "US1_J2KR.dcm", "US1_UNCR.dcm")
    np.testing.assert_array_equal(read_gray_frames(j2k)[0], read_gray_frames(rgb)[0])
    # big-endian palette LUTs (pydicom reads their 16-bit entries byte-swapped) = little-endian
    little, big = _need(us_files, "OBXXXX1A.dcm", "OBXXXX1A_expb.dcm")
    np.testing.assert_array_equal(read_gray_frames(big)[0], read_gray_frames(little)[0])
    # YBR_FULL_422 JPEG: the gray frame is the luma (Y) plane, not a second colour conversion
    (ybr,) = _need(us_files, "examples_ybr_color.dcm")
    luma = pydicom.pixels.pixel_array(ybr, index=0, raw=True)[..., 0].astype(int)
    gray = read_gray_frames(ybr, max_frames=1)[0].astype(int)
    assert np.abs(gray - luma).mean() < 1.0  # rounding / RGB clipping only


def test_cine_loop_subsampled_evenly(us_files):
    (cine,) = _need(us_files, "examples_ybr_color.dcm")  # 30 frames
    assert len(read_gray_frames(cine, max_frames=5)) == 5


def test_monochrome1_16bit_is_inverted_and_scaled(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    values = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = "US"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 16, 16, 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = values.tobytes()
    path = tmp_path / "mono1.dcm"
    ds.save_as(path, enforce_file_format=True)

    (frame,) = read_gray_frames(path)
    assert frame.dtype == np.uint8 and frame.shape == (16, 16)
    assert frame[0, 0] == 255 and frame[-1, -1] == 0  # MONOCHROME1: the lowest value is white
    assert np.all(np.diff(frame.ravel().astype(int)) <= 0)


def test_bad_files_are_skipped_with_a_warning(us_files, tmp_path):
    (good,) = _need(us_files, "US1_UNCR.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:4096])  # header intact, pixel data cut off
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"not a dicom file at all")

    with pytest.raises(DicomFrameError, match="truncated.dcm"):
        read_gray_frames(truncated)
    with pytest.warns(RuntimeWarning, match="skipping") as caught:
        frames, report = load_frames([truncated, good, garbage])
    assert len(caught) == 2
    assert len(frames) == 1 and frames[0].dtype == np.uint8 and frames[0].ndim == 2
    assert [Path(s["path"]).name for s in report["skipped"]] == ["truncated.dcm", "garbage.dcm"]
    assert all(s["reason"] for s in report["skipped"])
    assert report["files"] == 3 and report["files_used"] == 1


def test_exact_duplicate_frames_are_dropped(us_files):
    native, rle = _need(us_files, "OBXXXX1A.dcm", "OBXXXX1A_rle.dcm")  # same image, two syntaxes
    frames, report = load_frames([native, rle])
    assert len(frames) == 1 and report["duplicates_dropped"] == 1
    frames, report = load_frames([native, rle], dedupe=False)
    assert len(frames) == 2
