"""Sharpness: blurred twins score lower, contrast and input size do not matter, a blurred stretch shows in min."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.scoring.sharpness import Sharpness, sharpness

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scoring_synthetic.py, shared by the scorer tests
from scoring_synthetic import blur, decode_media, panning, static, texture  # noqa: E402


def test_blur_lowers_the_score_step_by_step() -> None:
    frames = panning(1, n=4)
    scores = [sharpness(frames if s == 0 else blur(frames, s)).median for s in (0, 1.0, 2.0, 3.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[2] < 0.5 * scores[0], f"a 2 px defocus should at least halve the score, got {scores}"


def test_contrast_and_brightness_do_not_change_the_score() -> None:
    frames = panning(2, n=3)
    dim = np.clip(frames.astype(np.float32) * 0.4 + 60, 0, 255).astype(np.uint8)
    a, b = sharpness(frames).median, sharpness(dim).median
    assert abs(a - b) / a < 0.1, (a, b)


def test_same_picture_scores_alike_at_different_input_sizes() -> None:
    big = texture(3, 768, 1280)
    scores = [sharpness(cv2.resize(big, (w, w * 3 // 5), interpolation=cv2.INTER_AREA)[None]).median for w in (640, 384, 320, 256)]
    assert max(scores) / min(scores) < 1.25, scores


def test_min_catches_a_defocused_stretch_inside_a_sharp_clip() -> None:
    frames = panning(4, n=8)
    frames[5:7] = blur(frames[5:7], 3.0)
    s = sharpness(frames)
    assert isinstance(s, Sharpness) and len(s.per_frame) == 8
    assert s.min == min(s.per_frame) and s.min < 0.3 * s.median
    assert int(np.argmin(s.per_frame)) in (5, 6)


def test_flat_and_smooth_gradient_frames_score_low_noise_scores_high() -> None:
    h, w = 192, 320
    ramp = np.repeat(np.linspace(0, 255, w, dtype=np.float32)[None], h, axis=0)
    gradient = np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8)[None]
    flat = np.full((1, h, w, 3), 90, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    textured = sharpness(static(5, n=1)).median
    assert sharpness(flat).median == 0.0
    assert sharpness(gradient).median < 0.05 * textured
    assert sharpness(noise).median > 3 * textured  # white noise is all finest-scale detail


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        sharpness(np.zeros((2, 10, 10), np.uint8))
    with pytest.raises(ValueError, match="at least one frame"):
        sharpness(np.zeros((0, 10, 10, 3), np.uint8))


def test_sample_defocused_twin_scores_below_the_sharp_one(sample_dir) -> None:
    from pipeline import media

    def median(name: str) -> float:
        info = media.probe(sample_dir / name)
        frames = np.stack([f for i, f in media.open_frames(sample_dir / name, info, max_side=384) if i % 6 == 0])
        return sharpness(frames).median

    sharp, defocused = median("sharp.mp4"), median("defocused.mp4")
    assert defocused < 0.3 * sharp, (sharp, defocused)


@pytest.mark.media
def test_real_footage_blurred_copy_scores_lower(media_dir) -> None:
    frames, _ = decode_media("stream-of-water.webm", every=15)
    a, b = sharpness(frames).median, sharpness(blur(frames, 2.0)).median
    assert b < 0.5 * a, (a, b)


def test_a_sharp_subject_on_a_soft_background_counts_as_sharp() -> None:
    # Shallow depth of field: a sharp quarter of the frame, the rest 3 px out of focus. It must score like the
    # wholly sharp picture, far above the wholly soft one and above even a mild 1.5 px defocus of all of it.
    frame = texture(5, 216, 384)
    soft = cv2.GaussianBlur(frame, (0, 0), 3.0)
    dof = soft.copy()
    dof[54:162, 96:288] = frame[54:162, 96:288]
    sharp, subject, blurred, mild = (sharpness(f[None]).median
                                     for f in (frame, dof, soft, cv2.GaussianBlur(frame, (0, 0), 1.5)))
    assert subject > 0.9 * sharp, (subject, sharp)
    assert subject > 3 * blurred and subject > 1.3 * mild, (subject, blurred, mild)


def test_low_percentile_catches_a_motion_blurred_stretch() -> None:
    frames = panning(6, n=20)
    k = np.zeros((9, 9), np.float32)
    k[4, :] = 1 / 9  # a horizontal camera shake smear
    frames[8:11] = np.stack([cv2.filter2D(f, -1, k) for f in frames[8:11]])
    s = sharpness(frames)
    assert s.low < 0.7 * s.median, (s.low, s.median)
