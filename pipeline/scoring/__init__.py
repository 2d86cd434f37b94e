"""Cheap, weight-free clip scores: pure functions of decoded frames, each returning a frozen dataclass.

No Ray, config or I/O here: the CPU stage (``pipeline/analyze.py``) feeds frames in and stores the results.
"""
from __future__ import annotations

from pipeline.scoring.motion import Motion, motion
from pipeline.scoring.overlay import Overlay, static_overlay
from pipeline.scoring.sharpness import Sharpness, sharpness

__all__ = ["Motion", "Overlay", "Sharpness", "motion", "sharpness", "static_overlay"]
