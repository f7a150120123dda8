"""Data: ingest of raw ultrasound (DICOM, NIfTI, images, video) into a clean corpus, and the
DALI / PyTorch loaders that feed training (``make_loader``)."""
from .dicom_frames import (DicomFrameError, load_demo_frames, load_frames, read_gray_frames,
                           ultrasound_test_files)
from .loader import make_loader

__all__ = ["DicomFrameError", "load_demo_frames", "load_frames", "make_loader",
           "read_gray_frames", "ultrasound_test_files"]
