"""The scorers' shared luma: one conversion of a clip's frames gives each scorer exactly what its own would."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.scoring._frames import luma
from pipeline.scoring.motion import motion
from pipeline.scoring.overlay import clip_overlay
from pipeline.scoring.sharpness import sharpness

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scoring_synthetic.py, shared by the scorer tests
from scoring_synthetic import panning, with_logo  # noqa: E402


def test_scores_from_a_shared_luma_equal_each_scorers_own() -> None:
    # (8, H, W, 3): a moving clip at the analysis rate, with a mark, so every scorer has something to find
    frames = with_logo(panning(3, n=24, speed=(3.0, 1.0))[::3])
    times = np.arange(len(frames)) / 8.0
    gray = luma(frames)
    assert gray.shape == frames.shape[:3] and gray.dtype == np.uint8
    assert sharpness(frames, luma=gray) == sharpness(frames)
    assert motion(frames, times, luma=gray) == motion(frames, times)
    with_luma, own = clip_overlay(frames, luma=gray)[0], clip_overlay(frames)[0]
    assert with_luma == own and own.box is not None  # the same mark found, with the same box


def test_a_luma_of_other_frames_is_refused_with_the_shapes() -> None:
    frames = panning(3, n=6, speed=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"sharpness: expected luma of shape \(6, \d+, \d+\) uint8"):
        sharpness(frames, luma=luma(frames[:5]))
    with pytest.raises(ValueError, match="motion: expected luma"):
        motion(frames, np.arange(6.0), luma=luma(frames).astype(np.float32))
