"""Data, in two wings that never meet: :mod:`.ingest` (raw ultrasound -- DICOM, NIfTI, images,
video -- into a clean corpus) and :mod:`.load` (a corpus -> the DALI / PyTorch batches that feed
training, ``make_loader``); :mod:`.simulate` makes the demo's simulated B-mode set.

The names below are imported on first use: ``ingest`` and its worker processes import this
package, and must not pay for torch (about 600 MB per process) that only the loaders need."""
from ..runtime.lazy import lazy_exports

LOADER_BACKENDS = ("auto", "dali", "torch")  # make_loader's backend: "auto" = DALI when it runs
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # the loaders' resize / rotation modes

_WHERE = {"DicomFrameError": ".ingest.dicom_frames",
          "load_frames": ".ingest.dicom_frames", "read_gray_frames": ".ingest.dicom_frames",
          "ultrasound_test_files": ".ingest.dicom_frames", "make_loader": ".load.loader"}

__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
