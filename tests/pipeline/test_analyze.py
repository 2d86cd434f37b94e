"""The CPU stage on the built-in sample: both decode paths agree; bad inputs become rejects."""
from __future__ import annotations

import pytest

from pipeline.analyze import analyze_video
from pipeline.scenecut import SceneCutConfig
from pipeline.settings import DecodeConfig, PrefilterConfig


def test_decord_and_pyav_paths_agree(sample_dir, sample_truth):
    path = str(sample_dir / "cuts.mp4")
    a = analyze_video(path, DecodeConfig(backend="auto"), SceneCutConfig(), PrefilterConfig())
    b = analyze_video(path, DecodeConfig(backend="decord"), SceneCutConfig(), PrefilterConfig())
    assert (a.video["decoder"], b.video["decoder"]) == ("pyav", "decord")
    assert a.video["cut_frames"] == b.video["cut_frames"] == list(sample_truth.item("cuts.mp4").cut_frames)
    assert [c.record["clip_id"] for c in a.clips] == [c.record["clip_id"] for c in b.clips]
    for x, y in zip(a.clips, b.clips):
        assert x.record["sharpness_median"] == pytest.approx(y.record["sharpness_median"], rel=0.1)
        assert x.record["motion_mean"] == pytest.approx(y.record["motion_mean"], rel=0.15, abs=0.5)


def test_every_bad_input_is_a_reject_not_an_exception(bad_inputs):
    for kind, path in bad_inputs.items():
        res = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
        assert res.video is None and res.reject is not None, kind
        assert res.reject["uri"] == str(path) and "expected" in res.reject["message"], res.reject
