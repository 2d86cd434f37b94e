"""Cheap, weight-free clip scores: pure functions of decoded frames, each returning a frozen dataclass.

- ``pipeline.scoring.sharpness.sharpness(frames) -> Sharpness``
- ``pipeline.scoring.motion.motion(frames, times_s) -> Motion``
- ``pipeline.scoring.overlay.static_overlay(frames) -> Overlay``

All three work on the frames' luma: a caller scoring one clip several ways converts it once with
``pipeline.scoring._frames.luma(frames)`` and passes it as ``luma=`` (the same scores, one conversion).

No Ray, config or I/O here: the CPU stage (``pipeline/analyze.py``) feeds frames in and stores the
results. The functions are not re-exported here, so ``pipeline.scoring.motion`` stays the module.
"""
