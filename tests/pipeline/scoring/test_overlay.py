"""Static overlay: a translucent mark over changing content is found and boxed; content alone, a static
shot, noise, shake and letterbox bars are not evidence."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.scoring.overlay import Overlay, static_overlay

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scoring_synthetic.py, shared by the scorer tests
from scoring_synthetic import (H, W, decode_media, handheld, iou, logo_mask, moving_object, panning,  # noqa: E402
                               static, with_logo)


def truth_box() -> tuple[float, float, float, float]:
    x, y, w, h = cv2.boundingRect((logo_mask() > 0).astype(np.uint8))
    return x / W, y / H, (x + w) / W, (y + h) / H


LOGO_FREE = {
    "pan": lambda: panning(1),
    "slow pan": lambda: panning(5, speed=(1.0, 0.3)),
    "fast pan": lambda: panning(4, speed=(20.0, 5.0)),
    "handheld shake": lambda: handheld(6),
    "moving object, static camera": lambda: moving_object(1),
    "noise": lambda: np.random.default_rng(0).integers(0, 256, (24, H, W, 3), dtype=np.uint8),
}


@pytest.mark.parametrize("name", sorted(LOGO_FREE))
def test_logo_free_content_scores_low(name: str) -> None:
    assert static_overlay(LOGO_FREE[name]()[::2]).score < 0.1


@pytest.mark.parametrize(
    ("name", "frames"),
    [
        ("white 45% over a pan", lambda: with_logo(panning(1))),
        ("white 25% over a pan", lambda: with_logo(panning(2), alpha=0.25)),
        ("black 50% over a pan", lambda: with_logo(panning(3), alpha=0.5, color=(0, 0, 0))),
        ("over a slow pan", lambda: with_logo(panning(5, speed=(1.0, 0.3)))),
        ("over a fast pan", lambda: with_logo(panning(4, speed=(20.0, 5.0)))),
    ],
)
def test_translucent_logo_over_moving_content_is_found_and_boxed(name: str, frames) -> None:
    o = static_overlay(frames()[::2])
    assert o.score > 0.8, o
    assert o.box is not None and iou(o.box, truth_box()) >= 0.5, o


def test_logo_over_shaking_camera_beats_the_shake_alone() -> None:
    shaky = handheld(6)
    clean, marked = static_overlay(shaky[::2]), static_overlay(with_logo(shaky)[::2])
    assert marked.score > 0.3 and marked.score > 5 * clean.score, (clean, marked)
    assert iou(marked.box, truth_box()) >= 0.4


def test_fully_static_shot_is_no_evidence_even_with_a_logo() -> None:
    assert static_overlay(static(1)[::2]) == Overlay(score=0.0, box=None)
    assert static_overlay(with_logo(static(1))[::2]).score == 0.0
    assert static_overlay(static(1, noise=3.0)[::2]).score < 0.05


def test_letterbox_bars_are_not_a_mark_but_a_logo_beside_them_is() -> None:
    bars = panning(1)
    bars[:, :24] = 0
    bars[:, -24:] = 0
    assert static_overlay(bars[::2]).score < 0.1
    marked = static_overlay(with_logo(bars)[::2])
    assert marked.score > 0.5 and iou(marked.box, truth_box()) >= 0.3, marked


def test_fewer_than_three_frames_give_no_evidence() -> None:
    assert static_overlay(with_logo(panning(1))[:2]) == Overlay(score=0.0, box=None)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        static_overlay(np.zeros((4, 8, 8), np.uint8))


def test_box_is_in_fractions_of_the_frame_at_any_input_size() -> None:
    big = with_logo(panning(1, h=288, w=480))  # larger than the working size: box must not change
    o = static_overlay(big[::2])
    assert o.score > 0.8 and iou(o.box, truth_box()) >= 0.5, o


def test_sample_logo_clip_beats_every_logo_free_clip(sample_dir, sample_truth) -> None:
    from pipeline import media
    from pipeline.scenecut import SceneCutConfig, clip_spans

    cfg = SceneCutConfig()
    scores: dict[str, Overlay] = {}
    for item in sample_truth.items:
        if item.fps is None:
            continue
        info = media.probe(sample_dir / item.file)
        frames = np.stack([f for _, f in media.open_frames(sample_dir / item.file, info, max_side=384)])
        for k, (s, e) in enumerate(clip_spans(list(item.cut_frames), len(frames), item.fps, cfg)):
            scores[f"{item.file}#{k}"] = static_overlay(frames[s:e:6])  # ~4 fps, as the CPU stage samples
    logo = scores.pop("logo.mp4#0")
    assert logo.box is not None and iou(logo.box, sample_truth.item("logo.mp4").logo_box) >= 0.5, logo
    assert all(logo.score > o.score for o in scores.values()), (logo, scores)
    assert max(o.score for o in scores.values()) < 0.3, scores


@pytest.mark.media
@pytest.mark.parametrize("name", ["car-detection.mp4", "friday.mp4", "stream-of-water.webm", "flower.webm"])
def test_real_footage_with_a_logo_added_scores_higher_and_is_boxed(media_dir, name: str) -> None:
    frames, times = decode_media(name, limit=300)
    step = max(1, round((len(times) - 1) / (times[-1] - times[0]) / 4))  # ~4 fps
    frames = np.stack([cv2.resize(f, (W, round(W * f.shape[0] / f.shape[1])), interpolation=cv2.INTER_AREA) for f in frames[::step][:40]])
    clean, marked = static_overlay(frames), static_overlay(with_logo(frames))
    assert marked.score > clean.score, (clean, marked)
    assert marked.box is not None and iou(marked.box, truth_box()) >= 0.4, marked
    assert clean.score < 0.35, clean
