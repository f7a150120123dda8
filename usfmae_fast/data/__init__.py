"""Data: real ultrasound frames (DICOM) and the PyTorch dataset / MAE augmentation."""
from .dicom_frames import (DicomFrameError, load_demo_frames, load_frames, read_gray_frames,
                           ultrasound_test_files)

__all__ = ["DicomFrameError", "load_demo_frames", "load_frames", "read_gray_frames",
           "ultrasound_test_files"]
