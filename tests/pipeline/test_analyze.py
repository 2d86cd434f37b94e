"""The CPU stage on the built-in sample: both decode paths agree; bad inputs become rejects."""
from __future__ import annotations

import cv2
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


def test_thread_settings_change_the_cpu_used_not_the_results(sample_dir):
    """One decoder thread or frame threads, OpenCV's own pool or one thread: the same cuts, clips and scores."""
    path = str(sample_dir / "cuts.mp4")
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        pooled = analyze_video(path, DecodeConfig(threads=3, opencv_threads=0), SceneCutConfig(), PrefilterConfig())
        assert cv2.getNumThreads() == 2  # 0: OpenCV's setting is left alone
        lean = analyze_video(path, DecodeConfig(threads=1, opencv_threads=1), SceneCutConfig(), PrefilterConfig())
        assert cv2.getNumThreads() == 1  # set for the process the analysis runs in
    finally:
        cv2.setNumThreads(before)
    assert pooled.video["cut_frames"] == lean.video["cut_frames"] and pooled.clips
    for x, y in zip(pooled.clips, lean.clips, strict=True):
        assert x.record == y.record
        assert (x.frames == y.frames).all() and x.preview == y.preview
