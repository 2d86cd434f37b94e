"""Fixtures shared by the pipeline tests: real footage, the built-in sample and broken inputs."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sample import SampleTruth, generate_sample, write_bad_inputs

MEDIA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "media"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """``<repo>/../shared/media`` (real footage); skips the test when the folder is absent."""
    if not MEDIA_DIR.is_dir():
        pytest.skip(f"real footage folder {MEDIA_DIR.resolve()} is absent")
    return MEDIA_DIR.resolve()


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> tuple[Path, SampleTruth]:
    """The built-in sample generated once per session: (folder, truth)."""
    out = tmp_path_factory.mktemp("sample")
    return out, generate_sample(out)


@pytest.fixture(scope="session")
def sample_dir(sample) -> Path:
    return sample[0]


@pytest.fixture(scope="session")
def sample_truth(sample) -> SampleTruth:
    return sample[1]


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """One broken file per failure kind (keys of ``pipeline.sample.BAD_INPUT_ERRORS``)."""
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))
