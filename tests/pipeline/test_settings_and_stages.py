from __future__ import annotations

from pathlib import Path

import pytest

from catalog import schema
from catalog.config import ConfigError
from pipeline.settings import CurateConfig
from pipeline.stages import ANALYZE_OUTPUTS, STAGES, get_stage

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_output_column_is_in_the_clips_schema():
    cols = set(schema.CLIPS.names)
    assert set(ANALYZE_OUTPUTS) <= cols
    for name, cls in STAGES.items():
        missing = set(cls.outputs) - cols
        assert not missing, f"stage {name} writes columns missing from catalog.schema.CLIPS: {missing}"


def test_unknown_stage_lists_the_known_ones():
    with pytest.raises(KeyError) as err:
        get_stage("wattermark")
    for name in STAGES:
        assert name in str(err.value)


def test_unknown_config_key_is_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[decode]\nmax_sid = 256\n")
    with pytest.raises(ConfigError, match="max_sid"):
        CurateConfig.load(cfg)
    cfg.write_text("[decods]\nmax_side = 256\n")
    with pytest.raises(ConfigError, match="decods"):
        CurateConfig.load(cfg)


def test_decode_threads_is_a_count(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[decode]\nthreads = 2\n")
    assert CurateConfig.load(cfg).decode.threads == 2
    for bad, says in (("-1", r"\[decode\] threads: expected an integer >= 0"), ('"auto"', "threads: expected int")):
        cfg.write_text(f"[decode]\nthreads = {bad}\n")
        with pytest.raises(ConfigError, match=says):
            CurateConfig.load(cfg)
    cfg.write_text("[decode]\nopencv_threads = -2\n")
    with pytest.raises(ConfigError, match=r"\[decode\] opencv_threads: expected an integer >= 0"):
        CurateConfig.load(cfg)


def test_shipped_configs_load():
    real = CurateConfig.load(REPO / "jobs" / "configs" / "curate.toml")
    assert real.models.standins is False
    assert real.models.clip_model == "ViT-L-14-quickgelu"
    default = CurateConfig.load(None)
    assert default.models.standins is True
