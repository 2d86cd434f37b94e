"""Odd frame sizes decode at their true size everywhere, and no decoder failure escapes as a non-MediaError."""
from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline import media
from pipeline.analyze import analyze_video
from pipeline.media import UnexpectedMediaError, iter_analysis, open_frames, output_size, probe, read_span
from pipeline.scenecut import SceneCutConfig
from pipeline.settings import DecodeConfig, PrefilterConfig

FRAMES = 72  # 3 s at 24 fps: long enough for a clip (min_clip_s 2)


def _pattern(i: int, w: int, h: int) -> np.ndarray:
    """Colour quadrants plus a moving bar: a chroma plane read with the wrong stride or size cannot match."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2, : w // 2] = (220, 40, 40)
    rgb[: h // 2, w // 2:] = (40, 200, 60)
    rgb[h // 2:, : w // 2] = (50, 60, 210)
    rgb[h // 2:, w // 2:] = (230, 220, 50)
    x = (i * 5) % max(1, w - 8)
    rgb[:, x:x + 8] = 255
    return rgb


def _write(path: Path, codec: str, w: int, h: int, pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "mpeg4":
            stream.codec_context.options = {"qscale": "2"}
        for i in range(FRAMES):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_pattern(i, w, h), format="rgb24")))
        container.mux(stream.encode())
    return path


# The shapes of issue 12 (an 853x480 VP9 WebM, a 161x121 MPEG-4 AVI), odd in one side only, a lossless
# 4:2:0 codec, and 4:4:4 H.264 (libx264 refuses odd 4:2:0).
ODD = {
    "vp9_853x480.webm": ("libvpx-vp9", 853, 480, "yuv420p"),
    "mpeg4_161x121.avi": ("mpeg4", 161, 121, "yuv420p"),
    "mpeg4_160x121.avi": ("mpeg4", 160, 121, "yuv420p"),
    "ffv1_97x64.mkv": ("ffv1", 97, 64, "yuv420p"),
    "h264_444_161x121.mp4": ("libx264", 161, 121, "yuv444p"),
}


@pytest.fixture(scope="module")
def odd_videos(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("odd")
    return {name: _write(out / name, *spec) for name, spec in ODD.items()}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_size_decodes_at_its_true_size(odd_videos, name):
    path = odd_videos[name]
    _, w, h, _ = ODD[name]
    info = probe(path)
    assert (info.width, info.height, info.display_width, info.display_height) == (w, h, w, h)
    assert info.frames == FRAMES

    full = np.stack([f for _, f in open_frames(path, info)])
    assert full.shape == (FRAMES, h, w, 3)
    # The decode is the picture that went in (lossy codecs: close, not equal), quadrant colours included.
    for i in (0, FRAMES // 2, FRAMES - 1):
        assert np.abs(full[i].astype(int) - _pattern(i, w, h)).mean() < 12, i

    small_w, small_h = output_size(info, 96)
    small = np.stack([f for _, f in open_frames(path, info, max_side=96)])
    assert small.shape == (FRAMES, small_h, small_w, 3)
    np.testing.assert_array_equal(read_span(path, info, 5, 9, max_side=96), small[5:9])
    np.testing.assert_array_equal(read_span(path, info, 0, 3), full[:3])


@pytest.mark.parametrize("name", sorted(ODD))
@pytest.mark.parametrize("max_side", [None, 64])
def test_odd_size_analysis_decode_agrees_with_open_frames(odd_videos, name, max_side):
    path = odd_videos[name]
    info = probe(path)
    ref = {i: f for i, f in open_frames(path, info)}
    w, h = output_size(info, max_side)
    got = list(iter_analysis(path, info, detect_width=48, max_side=max_side or 100_000, keep=lambda i: i % 3 == 0))
    assert [i for i, _, _ in got] == list(range(FRAMES))
    for i, small, rgb in got:
        # The detector's copy is the same picture: per-quadrant colour, so a misplaced chroma plane fails.
        sh, sw = small.shape[:2]
        expect_small = cv2.resize(ref[i], (sw, sh), interpolation=cv2.INTER_AREA)[..., ::-1]
        assert np.abs(small.astype(int) - expect_small).mean() < 6, (name, i)
        if i % 3:
            assert rgb is None
            continue
        assert rgb.shape == (h, w, 3)
        expect = cv2.resize(ref[i], (w, h), interpolation=cv2.INTER_AREA)
        assert np.abs(rgb.astype(int) - expect).mean() < 4, (name, i)


def test_odd_size_video_is_analysed_not_rejected(odd_videos):
    for name in ("vp9_853x480.webm", "mpeg4_161x121.avi"):
        res = analyze_video(str(odd_videos[name]), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
        assert res.reject is None, res.reject
        assert res.video["frames"] == FRAMES and res.video["width"] == ODD[name][1]
        # One shot: one clip over most of it (clip_spans trims the ends), scored on the full-size picture.
        (clip,) = res.clips
        assert clip.record["frames"] > FRAMES // 2 and clip.record["width"] == ODD[name][1]
        assert clip.frames is not None and clip.frames.shape[1:] == (*reversed(output_size(probe(odd_videos[name]), 384)), 3)


# ---------------------------------------------------------------------------------------------
# whatever a decoder raises for one input is a MediaError naming the original


def _boom(*args, **kwargs):
    raise AssertionError("width has to be even for this format")


@pytest.mark.parametrize("prefetch", [True, False])
def test_unexpected_error_in_the_analysis_decode_is_a_media_error(odd_videos, monkeypatch, prefetch):
    path = odd_videos["mpeg4_161x121.avi"]
    info = probe(path)
    monkeypatch.setattr(media, "_shrink_plane", _boom)
    with pytest.raises(UnexpectedMediaError, match="AssertionError: width has to be even") as err:
        list(iter_analysis(path, info, detect_width=48, max_side=64, keep=lambda i: True, prefetch=prefetch))
    assert str(path) in str(err.value) and isinstance(err.value.__cause__, AssertionError)


def test_unexpected_error_becomes_a_reject_row(odd_videos, monkeypatch):
    path = odd_videos["mpeg4_161x121.avi"]
    monkeypatch.setattr(media, "_shrink_plane", _boom)
    res = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    assert res.video is None
    assert res.reject["stage"] == "decode" and res.reject["error_class"] == "UnexpectedMediaError"
    assert res.reject["message"].startswith("AssertionError: width has to be even")


def test_unexpected_errors_in_probe_open_frames_and_read_span(odd_videos, monkeypatch):
    path = odd_videos["ffv1_97x64.mkv"]
    info = probe(path)
    monkeypatch.setattr(media, "_frame_rgb", lambda *a: [][0])  # an IndexError deep in a decode
    for prefetch in (True, False):
        with pytest.raises(UnexpectedMediaError, match="IndexError"):
            list(open_frames(path, info, prefetch=prefetch))
    with pytest.raises(UnexpectedMediaError, match="IndexError"):
        read_span(path, info, 0, 2)
    # The caller's own mistakes stay ValueErrors.
    with pytest.raises(ValueError, match="expected 0 <= start < end"):
        read_span(path, info, 3, 3)

    monkeypatch.setattr(media, "_probe_video", lambda *a: 1 / 0)
    with pytest.raises(UnexpectedMediaError, match="ZeroDivisionError") as err:
        probe(path)
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    res = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    assert res.reject["stage"] == "probe" and "ZeroDivisionError" in res.reject["message"]


def test_a_file_that_vanishes_before_probe_is_a_media_error(tmp_path):
    with pytest.raises(UnexpectedMediaError, match="FileNotFoundError"):
        probe(tmp_path / "gone.mp4", video_id="0" * 16)
