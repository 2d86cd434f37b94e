"""Suite-wide settings: Ray must never pick up a stray cluster or token file from the machine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDIA = REPO.parent / "shared" / "media"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_media() -> Path:
    if not SHARED_MEDIA.is_dir():
        pytest.skip(f"real footage folder {SHARED_MEDIA} is absent")
    return SHARED_MEDIA


@pytest.fixture(scope="session")
def sample_curation(tmp_path_factory) -> Path:
    """The built-in sample curated once per session and registered in its catalog, as `python -m jobs.curate`
    with no arguments does (in-process Ray, tiny stand-in models): the output folder, holding
    ``catalog.duckdb``. About 45 s here; tests that use it are marked slow."""
    import ray

    from catalog.db import register_run
    from pipeline.run import curate
    from pipeline.sample import generate_sample
    from pipeline.settings import CurateConfig

    root = tmp_path_factory.mktemp("sample_curation")
    generate_sample(root / "raw")
    cfg = CurateConfig.load(None, {"run": {"input": str(root / "raw"), "output": str(root / "out")},
                                   "models": {"standin_dir": str(root / "standins")}})
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        summary = curate(cfg)
    finally:
        if started:
            ray.shutdown()
    register_run(summary.output / "catalog.duckdb", summary.output)
    return summary.output
