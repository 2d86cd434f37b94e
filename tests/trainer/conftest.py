"""Trainer tests: one torch thread per process.

On this 2-core machine, with other processes busy, torch's default two OpenMP threads spin-wait
on each other and run 3D convolutions ~20x slower than one thread does.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- DiT stage: one tiny trained VAE, stand-in T5 and shards for every DiT test ----------------------------------


def _dit_fixtures():
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/dit_fixtures.py, shared with tests/jobs
    import dit_fixtures

    return dit_fixtures


@pytest.fixture(scope="session")
def dit_assets(tmp_path_factory) -> dict:
    """{"shards", "t5", "vae"}: synthetic 9x32x32 video and 1x32x32 image shards, a stand-in T5 and a
    tiny VAE run trained on them (latent scale measured and stored). ~15 s, once per session."""
    return _dit_fixtures().build_assets(tmp_path_factory.getbasetemp() / "dit_assets")


@pytest.fixture(scope="session")
def sample_dit_shards(sample_curation, tmp_path_factory):
    """The built-in sample's kept clips as 9-frame and image shards at 48x80-ish buckets (slow: needs the
    session's sample curation)."""
    return _dit_fixtures().build_sample_shards(sample_curation / "catalog.duckdb",
                                               tmp_path_factory.getbasetemp() / "sample_dit_shards")


@pytest.fixture(scope="session")
def sample_dit_run(dit_assets, sample_dit_shards, tmp_path_factory):
    """The tiny DiT trained 400 steps on the built-in sample's clips (dit_fixtures.train_sample_dit), once per
    session: the learning test checks it, the distillation test distils it (slow: ~1 min plus the curation)."""
    return _dit_fixtures().train_sample_dit(dit_assets, sample_dit_shards,
                                            tmp_path_factory.getbasetemp() / "sample_dit_run")
