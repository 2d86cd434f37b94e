"""Focus measure per frame: variance of the Laplacian of contrast-normalised luma at a fixed size.

Every frame is resized to a fixed working size (longer side ``WORK_SIDE``) first, so a clip decoded at
384 px and one decoded at 240 px are measured on the same scale, and its luma is normalised to zero
mean and unit standard deviation, so a dim or low-contrast shot is not mistaken for a blurred one.
What remains is the share of the image's variance that sits in the finest detail: a defocused frame
has almost none. Pure noise scores highest (about 0.7); in-focus footage lands around 0.03-0.3,
a Gaussian defocus of 2-3 px well below 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.scoring._frames import check_frames, working_size

WORK_SIDE = 256
SMOOTH = 1.0  # working-pixel Gaussian that fixes the measured band (see _working_luma)
# Luma spread (0-255 scale) below which a frame counts as flat: its sensor/codec noise is not
# promoted to "detail" by dividing by a tiny standard deviation (fades to black, blank title cards).
MIN_STD = 8.0


@dataclass(frozen=True, slots=True)
class Sharpness:
    min: float
    """Sharpness of the blurriest frame: catches a defocused stretch inside an otherwise sharp clip."""
    median: float
    per_frame: tuple[float, ...]


def _working_luma(frame_rgb: np.ndarray) -> np.ndarray:
    """Luma on the working grid, band-limited the same way whatever the input size.

    Plain area resampling blurs by an amount that depends on the scale ratio (a 320 px frame shrunk
    to 256 px lost more detail than a 512 px one shrunk by exactly 2), which made scores depend on
    the input size. A Gaussian of ``SMOOTH`` working pixels applied before resampling dominates the
    resampler's own blur, so a sharp frame scores about the same at 640, 384 or 256 px.
    """
    gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    w, h = working_size(gray.shape[0], gray.shape[1], WORK_SIDE)
    ratio = max(gray.shape) / WORK_SIDE
    if ratio > 1:
        gray = cv2.GaussianBlur(gray, (0, 0), SMOOTH * ratio)
        return cv2.resize(gray, (w, h), interpolation=cv2.INTER_LINEAR)
    if ratio < 1:
        gray = cv2.resize(gray, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(gray, (0, 0), SMOOTH)


def frame_sharpness(frame_rgb: np.ndarray) -> float:
    """Focus measure of one (H, W, 3) uint8 RGB frame."""
    gray = _working_luma(frame_rgb)
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
