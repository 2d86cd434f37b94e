"""Curation decisions on the development set of real footage (tests/pipeline/devset.py; skipped without
../shared/media): cuts through fades and in black-and-white film, blur ranking, frozen vs calm, MJPEG streams.

Thresholds were tuned on the ``tune`` split; every figure is asserted on the ``check`` split as well, whose
sources, offsets, orders and fade lengths the tuning never saw.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from catalog.shards import encode_h264
from pipeline.analyze import analyze_video
from pipeline.scenecut import SceneCutConfig
from pipeline.scoring.sharpness import sharpness
from pipeline.settings import DecodeConfig, PrefilterConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # devset.py, the development-set builder
import devset  # noqa: E402

CFG = (DecodeConfig(), SceneCutConfig(), PrefilterConfig())


def _write(path: Path, frames, fps: float = devset.FPS) -> Path:
    path.write_bytes(encode_h264(list(frames), fps=fps))
    return path


def _h264(frames: np.ndarray, step: int) -> np.ndarray:
    """Every ``step``-th frame after an H.264 round trip (what the analysis frames look like)."""
    with av.open(io.BytesIO(encode_h264(list(frames[::step]), fps=devset.FPS / step))) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def cut_results(shared_media, tmp_path_factory):
    out = tmp_path_factory.mktemp("devset_cuts")
    results = {}
    for split in ("tune", "check"):
        for v in devset.cut_videos(shared_media, split):
            res = analyze_video(str(_write(out / f"{v.name}.mp4", v.frames)), *CFG)
            assert res.video is not None, res.reject
            results[v.name] = (split, v, res)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("split", ["tune", "check"])
def test_cut_f1_with_fades_fast_cuts_and_grayscale(cut_results, split):
    tp = fp = fn = 0
    for name, (sp, v, res) in cut_results.items():
        if sp != split:
            continue
        _, t, p, n = devset.f1_within(res.video["cut_frames"], v.cuts, tol=2)
        tp, fp, fn = tp + t, fp + p, fn + n
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 >= 0.95, (split, tp, fp, fn, {k: (r[2].video["cut_frames"], r[1].cuts) for k, r in cut_results.items()})


@pytest.mark.slow
def test_grayscale_is_detected_and_switches_to_luma(cut_results):
    for name, (_, v, res) in cut_results.items():
        assert res.video["is_grayscale"] is v.grayscale, name
        assert ("luma=auto:True" in res.video["cut_detector"]) is v.grayscale, (name, res.video["cut_detector"])


@pytest.mark.slow
def test_no_clip_holds_a_black_or_fading_frame(cut_results):
    for name, (_, v, res) in cut_results.items():
        fades = res.video["fade_frames"]
        assert len(fades) == len(v.blacks), (name, fades, v.blacks)
        for (s, e), (b0, b1) in zip(fades, v.blacks):
            assert s <= b0 and b1 <= e, (name, fades, v.blacks)
        for clip in res.clips:
            a, b = clip.record["start_frame"], clip.record["end_frame"]
            assert all(b <= s or a >= e for s, e in fades), (name, (a, b), fades)


@pytest.mark.parametrize("split", ["tune", "check"])
def test_blurred_copies_rank_below_their_sharp_originals(shared_media, split):
    cut = PrefilterConfig().sharpness_min
    for name, sharp, blurred in devset.blur_sets(shared_media, split):
        ref = sharpness(_h264(sharp, 7)).low
        assert ref >= cut, (name, ref)  # in-focus footage passes the prefilter
        for kind, frames in blurred.items():
            low = sharpness(_h264(frames, 7)).low
            assert low < ref, (name, kind, low, ref)
            if kind == "defocus3":
                assert low < cut, (name, kind, low)  # a clearly defocused copy is dropped


def test_shallow_depth_of_field_ranks_above_defocused_handheld(shared_media):
    """A soft macro timelapse (flower.webm: sharp subject, soft background) over the handheld creek, defocused."""
    macro = sharpness(_h264(devset.source(shared_media, "flower.webm", 0, 72), 7)).low
    creek = devset.source(shared_media, "stream-of-water.webm", 0, 72)
    blurred = sharpness(_h264(devset.motion_blur(devset.defocus(creek, 1.5), 7, 30.0), 7)).low
    assert macro > blurred, (macro, blurred)


@pytest.fixture(scope="module")
def still_results(shared_media, tmp_path_factory):
    out = tmp_path_factory.mktemp("devset_still")
    res = {}
    for kind, clips in (("calm", devset.calm_clips(shared_media)), ("frozen", devset.frozen_clips(shared_media))):
        for k, (name, frames) in enumerate(clips.items()):
            r = analyze_video(str(_write(out / f"{kind}{k}.mp4", frames)), *CFG)
            assert r.video is not None and r.clips, (name, r.reject, r.video)
            res[name] = (kind, r.clips)
    return res


@pytest.mark.slow
def test_calm_footage_is_kept_and_frozen_footage_is_static(still_results):
    for name, (kind, clips) in still_results.items():
        for c in clips:
            static = "static" in c.record["reject_reasons"]
            assert static is (kind == "frozen"), (name, c.record["pixel_change"], c.record["motion_mean"],
                                                  c.record["reject_reasons"])


def test_raw_mjpeg_stream_named_avi_is_a_video(shared_media, tmp_path):
    path = tmp_path / "webcam.avi"
    path.write_bytes(devset.mjpeg_stream(shared_media, n=78))
    res = analyze_video(str(path), *CFG)
    assert res.video is not None, res.reject
    assert res.video["is_image"] is False and res.video["frames"] == 78
    assert res.video["duration"] == pytest.approx(78 / 25)  # FFmpeg's pipe demuxer plays it at 25 fps
    assert res.video["num_clips"] == len(res.clips) == 1 and res.video["no_clip_reason"] is None


def test_every_video_without_clips_says_why(shared_media, tmp_path):
    real = devset.source(shared_media, "again.mkv", 0, 78)
    black = np.zeros((90, *real.shape[1:]), np.uint8)
    cases = {
        "all_black": black,
        "too_short": real[:45],
        # 1.2 s shots: every scene is under the 2 s minimum once trimmed
        "scenes_too_short": np.concatenate([devset.source(shared_media, n, 0, 36) for n in
                                            ("again.mkv", "flower.webm", "stream-of-water.webm", "car-detection.mp4")]),
        "mostly_black": np.concatenate([black[:40], real[:50], black[:40]]),
    }
    for reason, frames in cases.items():
        res = analyze_video(str(_write(tmp_path / f"{reason}.mp4", frames)), *CFG)
        assert res.video is not None, res.reject
        assert res.video["num_clips"] == 0 and res.video["no_clip_reason"] == reason, (reason, res.video)
    ok = analyze_video(str(_write(tmp_path / "ok.mp4", real)), *CFG)
    assert ok.video["num_clips"] == 1 and ok.video["no_clip_reason"] is None
