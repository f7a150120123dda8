"""Ingest: raw ultrasound files (DICOM, NIfTI, images, video) -> a clean corpus of 8-bit images
+ ``manifest.csv`` (:mod:`.pipeline`), read by :mod:`.readers` (DICOM frames in
:mod:`.dicom_frames`, large PNGs in strips by :mod:`.png_stream`) and cleaned by :mod:`.clean`.

Torch-free: ``ingest`` and its worker processes never import torch."""
from .pipeline import (MANIFEST_COLUMNS, IngestConfig, IngestError, IngestOptions, find_sources, ingest,
                       ingest_file, run_parallel, write_shards)

__all__ = ["MANIFEST_COLUMNS", "IngestConfig", "IngestError", "IngestOptions", "find_sources", "ingest",
           "ingest_file", "run_parallel", "write_shards"]
