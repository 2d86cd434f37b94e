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


def gray_at(frame_rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Luma of one RGB frame resized to ``size`` (w, h): area-averaged when shrinking, linear when growing."""
    gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)
    if (gray.shape[1], gray.shape[0]) == size:
        return gray
    shrink = size[0] < gray.shape[1]
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
