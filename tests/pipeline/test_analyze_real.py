"""The CPU stage on real footage from ../shared/media (skipped when the folder is absent)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from catalog.shards import encode_h264
from pipeline.analyze import analyze_video
from pipeline.scenecut import SceneCutConfig
from pipeline.settings import DecodeConfig, PrefilterConfig

CFG = (DecodeConfig(), SceneCutConfig(), PrefilterConfig())


def _frames(path: Path, n: int, size=(320, 240)) -> list[np.ndarray]:
    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            out.append(f.to_ndarray(width=size[0], height=size[1], format="rgb24"))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def joined(shared_media, tmp_path_factory):
    """Three real single-shot clips, resized to one size and joined: the joins are cuts at known frames."""
    parts = [_frames(shared_media / name, 75) for name in ("stream-of-water.webm", "friday.mp4", "flower.webm")]
    path = tmp_path_factory.mktemp("real") / "joined.mp4"
    path.write_bytes(encode_h264([f for p in parts for f in p], fps=25))
    joins = list(np.cumsum([len(p) for p in parts])[:-1])
    return path, joins


def test_cuts_at_the_joins_of_real_clips(joined):
    path, joins = joined
    res = analyze_video(str(path), *CFG)
    assert res.video is not None, res.reject
    cuts = res.video["cut_frames"]
    assert len(cuts) == len(joins), (cuts, joins)
    assert all(abs(c - j) <= 2 for c, j in zip(cuts, joins)), (cuts, joins)


def test_real_static_camera_scores_low_motion(shared_media):
    static = analyze_video(str(shared_media / "bottle-detection.mp4"), *CFG)
    handheld = analyze_video(str(shared_media / "stream-of-water.webm"), *CFG)
    s = [c.record["motion_mean"] for c in static.clips]
    h = [c.record["motion_mean"] for c in handheld.clips]
    assert s and h
    # People do walk through the tripod shot later on; its quiet opening clip is the static one.
    assert min(s) < 1.0, s
    assert min(s) < min(h) / 1.5, (s, h)


@pytest.mark.parametrize("name", ["flower.webm", "stream-of-water.webm", "bbb_480p_vp9_opus_1second.webm", "again.mkv",
                                  "car-detection.mp4"])
def test_real_containers_decode(shared_media, name):
    res = analyze_video(str(shared_media / name), *CFG)
    assert res.reject is None, res.reject
    v = res.video
    assert v["frames"] > 20 and v["decoder"] in ("decord", "pyav")
    if name.endswith(".webm"):
        assert v["decoder"] == "pyav"  # decord is unreliable on webm
    assert v["num_clips"] == len(res.clips)


@pytest.mark.parametrize("name,aspect", [("leopard.jpg", 1244 / 416), ("ice-cream.jpg", 1.0), ("elephant-660-480.jpg", 660 / 480)])
def test_real_images_are_one_frame_clips(shared_media, name, aspect):
    res = analyze_video(str(shared_media / name), *CFG)
    assert res.reject is None, res.reject
    assert res.video["is_image"] and abs(res.video["display_aspect"] - aspect) < 0.01
    (clip,) = res.clips
    assert clip.record["frames"] == 1 and clip.record["sharpness_median"] > 0
