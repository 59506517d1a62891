"""fp-ray: long FramePack videos, rendered locally or on Ray."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

TINY_CHECKPOINT = Path(__file__).resolve().parent / "tiny"
SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"
