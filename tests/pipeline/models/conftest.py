"""Stand-in models, built once per test session and loaded through the real loading code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.standins import Standins, build_standins


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread
    (measured 0.19 s vs 1.4 s per stand-in caption under load); restored after each module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def standins(tmp_path_factory: pytest.TempPathFactory) -> Standins:
    return build_standins(tmp_path_factory.mktemp("models") / "standins")


def _make_clip(n: int, h: int, w: int, *, seed: int) -> np.ndarray:
    """A clip of blocky random frames (noise at 1/8 resolution, upsampled): RGB uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, -(-h // 8), -(-w // 8), 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(8, axis=1).repeat(8, axis=2)[:, :h, :w])


@pytest.fixture(scope="session")
def make_clip():
    """``make_clip(n, h, w, seed=...)`` → a deterministic random clip."""
    return _make_clip
