"""Data: ingest of raw ultrasound (DICOM, NIfTI, images, video) into a clean corpus, and the
DALI / PyTorch loaders that feed training (``make_loader``).

The names below are imported on first use: ``ingest`` and its worker processes import this
package, and must not pay for torch (about 600 MB per process) that only the loaders need."""
from ..runtime.lazy import lazy_exports

LOADER_BACKENDS = ("auto", "dali", "torch")  # make_loader's backend: "auto" = DALI when it runs

_WHERE = {"DicomFrameError": ".dicom_frames",
          "load_frames": ".dicom_frames", "read_gray_frames": ".dicom_frames",
          "ultrasound_test_files": ".dicom_frames", "make_loader": ".loader"}

__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
