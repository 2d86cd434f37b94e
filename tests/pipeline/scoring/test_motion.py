"""Motion: known pan speeds are measured in px/s at 256 px, a static shot is ~0, real static camera < handheld."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.scoring.motion import Motion, motion

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scoring_synthetic.py, shared by the scorer tests
from scoring_synthetic import decode_media, moving_object, panning, static  # noqa: E402

FPS = 24.0


def at_2fps(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    times = np.arange(len(frames)) / FPS
    return frames[::12], times[::12]


def expected_speed(speed_px_per_frame: tuple[float, float], width: int = 320) -> float:
    """px/s at 256 px longer side of a pan of ``speed`` px per frame on a ``width``-wide frame."""
    return float(np.hypot(*speed_px_per_frame)) * FPS * 256 / width


@pytest.mark.parametrize("speed", [(1.0, 0.3), (3.0, 1.0), (6.0, 2.0)])
def test_pan_speed_is_measured(speed: tuple[float, float]) -> None:
    # 6 px/frame is 58 px between 2 fps samples at 256 px: beyond Farneback alone, caught by the global start.
    m = motion(*at_2fps(panning(1, n=48, speed=speed)))
    truth = expected_speed(speed)
    assert abs(m.mean - truth) < 0.1 * truth, (m, truth)
    assert m.max >= m.mean


def test_speed_is_in_256px_units_whatever_the_input_size() -> None:
    small = panning(2, n=48, speed=(2.0, 0.0), h=120, w=200)  # 2 px/frame at 200 px
    big = panning(2, n=48, speed=(3.2, 0.0), h=192, w=320)  # the same pan at 320 px
    a, b = motion(*at_2fps(small)).mean, motion(*at_2fps(big)).mean
    assert abs(a - b) < 0.1 * b, (a, b)
    assert abs(b - expected_speed((3.2, 0.0))) < 0.1 * b


def test_static_shot_is_near_zero() -> None:
    assert motion(*at_2fps(static(1, n=48))).max < 0.05
    noisy = motion(*at_2fps(static(1, n=48, noise=3.0)))
    assert noisy.mean < 0.5, noisy


def test_moving_object_on_static_background_registers() -> None:
    still = motion(*at_2fps(static(1, n=48, noise=2.0))).mean
    assert motion(*at_2fps(moving_object(1, n=48))).mean > 5 * still + 0.5


def test_speed_scales_with_time_between_samples() -> None:
    frames, times = at_2fps(panning(3, n=48, speed=(2.0, 0.0)))
    a, b = motion(frames, times), motion(frames, times * 2)
    assert b.mean == pytest.approx(a.mean / 2, rel=1e-6)


def test_max_catches_a_burst_of_motion() -> None:
    pan = panning(4, n=24, speed=(4.0, 0.0))
    frames = np.concatenate([np.repeat(pan[:1], 36, axis=0), pan])  # 1.5 s still, then 1 s of pan
    m = motion(*at_2fps(frames))
    assert m.max > 3 * m.mean > 0


def test_one_frame_is_zero_and_bad_input_raises() -> None:
    frame = panning(5, n=1)
    assert motion(frame, np.array([0.0])) == Motion(mean=0.0, max=0.0, change=0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        motion(panning(5, n=2), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="one time per frame"):
        motion(panning(5, n=2), np.array([0.0]))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        motion(np.zeros((2, 8, 8), np.uint8), np.array([0.0, 0.5]))


def test_sample_static_is_near_zero_and_below_moving(sample_dir, sample_truth) -> None:
    from pipeline import media

    def measure(name: str) -> Motion:
        info = media.probe(sample_dir / name)
        picked = [(i, f) for i, f in media.open_frames(sample_dir / name, info, max_side=384) if i % 12 == 0]
        return motion(np.stack([f for _, f in picked]), np.array([i / info.fps for i, _ in picked]))

    still, moving = measure("static.mp4"), measure("moving.mp4")
    assert still.max < 0.5, still
    item = sample_truth.item("moving.mp4")
    truth = float(np.hypot(*item.pan)) * item.fps * 256 / item.width
    assert abs(moving.mean - truth) < 0.2 * truth, (moving, truth)


@pytest.mark.media
def test_real_static_camera_moves_less_than_handheld(media_dir) -> None:
    def measure(name: str) -> Motion:
        frames, times = decode_media(name, limit=240)
        step = max(1, round((len(times) - 1) / (times[-1] - times[0]) / 2))  # ~2 fps
        return motion(frames[::step], times[::step])

    tripod, handheld = measure("bottle-detection.mp4"), measure("stream-of-water.webm")
    assert tripod.mean < handheld.mean, (tripod, handheld)
    assert tripod.mean < 1.0
