"""Focus measure per frame: variance of the Laplacian of contrast-normalised luma at a fixed size.

Every frame is resized to a fixed working size (longer side ``WORK_SIDE``) first, so a clip decoded at
384 px and one decoded at 240 px are measured on the same scale, and its luma is normalised to zero
mean and unit standard deviation, so a dim or low-contrast shot is not mistaken for a blurred one.
What remains is the share of the image's variance that sits in the finest detail: a defocused frame
has almost none. Pure noise scores highest (about 20); in-focus footage lands around 0.1-2.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.scoring._frames import check_frames, gray_at, working_size

WORK_SIDE = 256
# Luma spread (0-255 scale) below which a frame counts as flat: its sensor/codec noise is not
# promoted to "detail" by dividing by a tiny standard deviation (fades to black, blank title cards).
MIN_STD = 8.0


@dataclass(frozen=True, slots=True)
class Sharpness:
    min: float
    """Sharpness of the blurriest frame: catches a defocused stretch inside an otherwise sharp clip."""
    median: float
    per_frame: tuple[float, ...]


def frame_sharpness(frame_rgb: np.ndarray) -> float:
    """Focus measure of one (H, W, 3) uint8 RGB frame."""
    size = working_size(frame_rgb.shape[0], frame_rgb.shape[1], WORK_SIDE)
    gray = gray_at(frame_rgb, size).astype(np.float32)
    _, std = cv2.meanStdDev(gray)
    lap = cv2.Laplacian(gray, cv2.CV_32F, ksize=1)
    # Border pixels see the replicated edge, not the picture.
    _, lap_std = cv2.meanStdDev(lap[1:-1, 1:-1])
    return float(lap_std[0, 0] ** 2 / max(float(std[0, 0]), MIN_STD) ** 2)


def sharpness(frames: np.ndarray) -> Sharpness:
    """Per-frame focus measure of (N, H, W, 3) uint8 RGB frames, with its minimum and median."""
    frames = check_frames(frames, "sharpness")
    if len(frames) == 0:
        raise ValueError("sharpness: expected at least one frame, got 0")
    per = tuple(frame_sharpness(f) for f in frames)
    return Sharpness(min=min(per), median=float(np.median(per)), per_frame=per)
