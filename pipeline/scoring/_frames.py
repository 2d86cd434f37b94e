"""Shared frame checks and grayscale downscaling for the scorers."""
from __future__ import annotations

import cv2
import numpy as np


def check_frames(frames: np.ndarray, who: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{who}: expected frames of shape (N, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise ValueError(f"{who}: expected frames at least 2x2 px, got {frames.shape[2]}x{frames.shape[1]}")
    return frames


def working_size(h: int, w: int, longer: int) -> tuple[int, int]:
    """(width, height) with the longer side equal to ``longer``, aspect kept."""
    s = longer / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def shrink(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (w, h): whole-factor area averaging, then linear for the rest.

    OpenCV's area resampling is ~5x slower at a fractional ratio (384 -> 160) than at a whole one
    (384 -> 192); averaging by the whole factor first keeps the anti-aliasing at a fraction of the cost.
    """
    h, w = img.shape[:2]
    if (w, h) == size:
        return img
    if size[0] > w:
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    k = min(w // size[0], h // size[1])
    if k < 2:
        # Below 2x, bilinear already reads every source pixel; area resampling at a fractional ratio is ~20x slower.
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    img = cv2.resize(img, (w // k, h // k), interpolation=cv2.INTER_AREA)
    if (img.shape[1], img.shape[0]) == size:
        return img
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)  # the remaining ratio is < 2


def luma(frames: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 luma of (N, H, W, 3) uint8 RGB frames, in one conversion for the whole stack.

    The scorers all work on luma: a caller that scores the same frames several ways converts them once here and
    hands each scorer ``luma=``. The conversion is per pixel, so the stack's is each frame's, exactly."""
    n, h, w = frames.shape[:3]
    return cv2.cvtColor(np.ascontiguousarray(frames).reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w)


def check_luma(luma_: np.ndarray | None, frames: np.ndarray, who: str) -> np.ndarray:
    """``luma_`` of ``frames`` as a caller handed it (its shape checked), or computed when None."""
    if luma_ is None:
        return luma(frames)
    if luma_.shape != frames.shape[:3] or luma_.dtype != np.uint8:
        raise ValueError(f"{who}: expected luma of shape {frames.shape[:3]} uint8 (one per frame), "
                         f"got {luma_.shape} {luma_.dtype}")
    return luma_
