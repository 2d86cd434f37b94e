"""Probe and decode: the built-in sample, real footage, hand-made edge cases and broken inputs."""
from __future__ import annotations

import shutil
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from catalog.schema import VIDEOS
from catalog.shards import encode_h264
from pipeline.media import (ALPHA_BACKGROUND, DecodeError, MediaError, NotMediaError, UnsupportedFormatError,
                            UnsupportedSizeError, content_hash, iter_analysis, open_frames, output_size, probe,
                            read_span)
from pipeline.sample import BAD_INPUT_ERRORS

# Real footage as its README describes it: (size, fps, duration s, has_audio, container, codec).
REAL_VIDEOS = {
    "again.mkv": ((640, 480), 30.0, 2.6, False, "matroska", "h264"),
    "bbb_480p_vp9_opus_1second.webm": ((854, 480), 24.0, 1.0, True, "webm", "vp9"),
    "bottle-detection.mp4": ((640, 360), 29.83, 39.9, False, "mp4", "h264"),
    "car-detection.mp4": ((768, 432), 12.5, 30.2, True, "mp4", "h264"),
    "flower.webm": ((960, 540), 29.97, 5.0, True, "webm", "vp8"),
    "friday.mp4": ((640, 480), 30.0, 6.2, True, "mp4", "h264"),
    "one-by-one-person-detection.mp4": ((768, 432), 10.0, 139.4, False, "mp4", "h264"),
    "stream-of-water.webm": ((480, 360), 29.97, 3.0, True, "webm", "vp8"),
}
REAL_IMAGES = {"elephant-660-480.jpg": (660, 480), "ice-cream.jpg": (1721, 1721), "leopard.jpg": (1244, 416)}
LONG = {"bottle-detection.mp4", "one-by-one-person-detection.mp4", "car-detection.mp4"}


def _frames(path, info, **kw) -> np.ndarray:
    return _collect(open_frames(path, info, **kw))


def _collect(stream) -> np.ndarray:
    out = []
    for expected_index, (index, rgb) in enumerate(stream):
        assert index == expected_index, f"frame indices must run 0, 1, 2, ...; got {index} at {expected_index}"
        out.append(rgb)
    return np.stack(out)


def _plain_decode_count(path: Path) -> int:
    """Independent oracle: frames FFmpeg's own decode loop outputs."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# ---------------------------------------------------------------------------------------------
# identity and row shape


def test_content_hash_is_stable_under_renaming_and_changes_with_content(sample_dir, tmp_path):
    src = sample_dir / "sharp.mp4"
    renamed = tmp_path / "a completely different name.mov"
    shutil.copyfile(src, renamed)
    assert content_hash(renamed) == content_hash(src)
    assert len(content_hash(src)) == 16 and int(content_hash(src), 16) >= 0
    assert probe(renamed).video_id == probe(src).video_id
    assert content_hash(sample_dir / "defocused.mp4") != content_hash(src)
    # A caller that already hashed the file passes the id instead of reading the file twice.
    assert probe(src, video_id=content_hash(src)) == replace(probe(src), probe_seconds=pytest.approx(0, abs=60))


def test_to_row_uses_only_videos_columns(sample_dir):
    row = probe(sample_dir / "cuts.mp4").to_row()
    assert set(row) <= set(VIDEOS.names), set(row) - set(VIDEOS.names)
    for required in ("video_id", "uri", "frames", "fps", "display_aspect", "has_audio", "probe_seconds"):
        assert required in row


# ---------------------------------------------------------------------------------------------
# the built-in sample


def test_probe_sample_items_match_truth(sample_dir, sample_truth):
    for item in sample_truth.items:
        info = probe(sample_dir / item.file)
        assert (info.width, info.height) == (item.width, item.height), item.file
        assert info.frames == item.frames, item.file
        assert info.display_aspect == pytest.approx(item.width / item.height), item.file
        assert info.rotation == 0 and info.sample_aspect == 1.0 and not info.has_audio
        if item.kind == "image":
            assert info.is_image and info.fps is None and info.container == "image/jpeg"
        else:
            assert not info.is_image and not info.fps_variable
            assert (info.container, info.codec) == ("mp4", "h264")
            assert info.fps == pytest.approx(item.fps)
            assert info.duration == pytest.approx(item.frames / item.fps)


def test_open_frames_sample_yields_every_frame_downscaled(sample_dir, sample_truth):
    for item in sample_truth.items:
        path = sample_dir / item.file
        info = probe(path)
        frames = _frames(path, info, max_side=160)
        expected = (1, 106, 160, 3) if item.kind == "image" else (item.frames, 96, 160, 3)
        assert frames.shape == expected, item.file
        assert frames.dtype == np.uint8
        assert frames.std() > 10, f"{item.file} decodes to flat frames"


def test_decoder_choice(sample_dir):
    mp4 = sample_dir / "sharp.mp4"
    assert open_frames(mp4, probe(mp4)).decoder == "decord"
    jpg = sample_dir / "still.jpg"
    assert open_frames(jpg, probe(jpg)).decoder == "pillow"
    with pytest.raises(ValueError, match="backend"):
        open_frames(mp4, probe(mp4), backend="opencv")


def test_webm_and_mkv_never_go_to_decord(media_dir):
    for name in ("flower.webm", "bbb_480p_vp9_opus_1second.webm", "again.mkv"):
        stream = open_frames(media_dir / name, probe(media_dir / name), max_side=64)
        assert stream.decoder == "pyav", name
        _collect(stream)
        assert stream.decoder == "pyav", name


@pytest.mark.parametrize("max_side", [None, 160])
def test_decord_and_pyav_agree_on_h264(sample_dir, max_side):
    path = sample_dir / "sharp.mp4"
    info = probe(path)
    a = _frames(path, info, max_side=max_side, backend="decord").astype(np.int16)
    b = _frames(path, info, max_side=max_side, backend="pyav").astype(np.int16)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    if max_side is None:
        assert diff.max() == 0  # same FFmpeg decoder and colour conversion at full size
    else:
        assert diff.mean() < 2.0, f"decoders' downscaled frames differ by {diff.mean():.2f} on average"


def test_output_size_is_even_and_bounded(sample_dir):
    info = probe(sample_dir / "cuts.mp4")
    assert output_size(info, None) == (320, 192)
    assert output_size(info, 1000) == (320, 192)
    for max_side in (64, 100, 150, 255):
        w, h = output_size(info, max_side)
        assert w % 2 == 0 and h % 2 == 0 and max(w, h) <= max_side
        assert w / h == pytest.approx(320 / 192, rel=0.05)


def test_read_span_matches_the_stream(sample_dir):
    path = sample_dir / "cuts.mp4"
    info = probe(path)
    every = _frames(path, info, max_side=160, backend="pyav")
    for start, end in ((0, 5), (80, 90), (150, 170), (info.frames - 3, info.frames)):
        span = read_span(path, info, start, end, max_side=160)
        assert span.shape == (end - start, 96, 160, 3)
        np.testing.assert_array_equal(span, every[start:end], err_msg=f"span [{start}, {end})")
    with pytest.raises(ValueError, match="start < end"):
        read_span(path, info, 10, 10)
    with pytest.raises(ValueError, match="start < end"):
        read_span(path, info, 0, info.frames + 1)


def test_read_span_of_an_image(sample_dir):
    path = sample_dir / "still.jpg"
    info = probe(path)
    span = read_span(path, info, 0, 1, max_side=192)
    assert span.shape == (1, 128, 192, 3)
    np.testing.assert_array_equal(span[0], _frames(path, info, max_side=192)[0])


# ---------------------------------------------------------------------------------------------
# real footage


@pytest.mark.parametrize("name", sorted(REAL_VIDEOS))
def test_probe_real_video(media_dir, name):
    path = media_dir / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    (w, h), fps, duration, has_audio, container, codec = REAL_VIDEOS[name]
    info = probe(path)
    assert (info.width, info.height) == (w, h)
    assert (info.display_width, info.display_height) == (w, h)
    assert info.display_aspect == pytest.approx(w / h)
    assert info.fps == pytest.approx(fps, rel=0.005)
    assert info.duration == pytest.approx(duration, abs=0.1)
    assert info.frames == pytest.approx(info.duration * info.fps, abs=0.5)
    assert info.has_audio is has_audio
    assert (info.container, info.codec) == (container, codec)
    assert not info.is_image and not info.fps_variable and info.rotation == 0


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in LONG else n for n in sorted(REAL_VIDEOS)])
def test_probe_count_equals_plain_decode(media_dir, name):
    path = media_dir / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    assert probe(path).frames == _plain_decode_count(path)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in LONG else n for n in sorted(REAL_VIDEOS)])
def test_open_frames_real_video_yields_probe_count(media_dir, name):
    path = media_dir / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    info = probe(path)
    stream = open_frames(path, info, max_side=128)
    frames = _collect(stream)
    assert len(frames) == info.frames == len(stream)
    assert frames.shape[1:] == (*reversed(output_size(info, 128)), 3)
    # Real footage changes over time and is not blank.
    assert frames.std() > 5
    assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() > 0.5


def test_webm_invisible_frames_are_not_counted(media_dir):
    # stream-of-water.webm stores 95 VP8 packets, 5 of them invisible alt-ref frames.
    path = media_dir / "stream-of-water.webm"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with av.open(str(path)) as container:
        packets = sum(1 for p in container.demux(video=0) if p.size)
    info = probe(path)
    assert packets > info.frames == _plain_decode_count(path)


@pytest.mark.parametrize("name", ["stream-of-water.webm", "again.mkv", "bbb_480p_vp9_opus_1second.webm", "friday.mp4"])
def test_read_span_real_video_matches_the_stream(media_dir, name):
    path = media_dir / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    info = probe(path)
    every = _frames(path, info, max_side=96, backend="pyav")
    n = info.frames
    for start, end in ((0, 2), (n // 2 - 3, n // 2 + 4), (n - 5, n)):
        np.testing.assert_array_equal(read_span(path, info, start, end, max_side=96), every[start:end],
                                      err_msg=f"{name} span [{start}, {end})")


def test_decord_is_refused_where_it_is_wrong(media_dir):
    path = media_dir / "flower.webm"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with pytest.raises(ValueError, match="webm/vp8"):
        open_frames(path, probe(path), backend="decord")


def test_full_range_mkv_decodes_to_full_range_rgb(media_dir):
    path = media_dir / "again.mkv"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    info = probe(path)
    frames = _frames(path, info)
    assert frames.shape == (info.frames, 480, 640, 3)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        assert frame.format.name == "yuvj420p"
        plane = frame.planes[0]
        y = np.frombuffer(plane, np.uint8).reshape(plane.height, -1)[:, :frame.width].astype(np.float32)
    rgb = frames[0].astype(np.float32)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    # Full range: luma is the coded Y itself. Read as limited range it would be stretched by 255/219.
    assert np.abs(luma - y).mean() < 2
    assert np.abs(luma - (y - 16) * 255 / 219).mean() > 4


@pytest.mark.parametrize("name", sorted(REAL_IMAGES))
def test_probe_and_decode_real_image(media_dir, name):
    path = media_dir / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    w, h = REAL_IMAGES[name]
    info = probe(path)
    assert info.is_image and info.frames == 1 and info.fps is None and info.duration == 0.0
    assert (info.width, info.height, info.display_aspect) == (w, h, pytest.approx(w / h))
    assert (info.container, info.codec) == ("image/jpeg", "jpeg")
    stream = open_frames(path, info, max_side=256)
    (index, rgb), = list(stream)
    assert index == 0 and stream.decoder == "pillow"
    assert rgb.shape == (*reversed(output_size(info, 256)), 3) and max(rgb.shape[:2]) == 256
    full = np.asarray(Image.open(path).convert("RGB").resize(rgb.shape[1::-1], Image.Resampling.BOX))
    assert np.abs(full.astype(int) - rgb.astype(int)).mean() < 6, "downscaled image must still be the image"


# ---------------------------------------------------------------------------------------------
# hand-made edge cases: rotation, sample aspect, edit lists, variable frame rate, images


def _marker_frames(n: int, w: int, h: int) -> list[np.ndarray]:
    """A white block in the top-left corner over a dark frame whose blue channel counts frames."""
    frames = []
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 2] = 4 * i
        a[: h // 4, : w // 4] = 255
        frames.append(a)
    return frames


def _encode(path: Path, frames, *, rotation_ccw=None, sar=None, shift_frames=0, vfr=False) -> Path:
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        if vfr:
            stream.codec_context.time_base = Fraction(1, 96)
        if sar:
            stream.codec_context.sample_aspect_ratio = Fraction(sar)
        if rotation_ccw is not None:
            stream.set_display_rotation(rotation_ccw)
        packets, t = [], 0
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if vfr:  # alternate 1/48 s and 1/16 s frames: 24 fps on average, far from constant
                frame.pts, frame.time_base = t, Fraction(1, 96)
                t += 2 if i % 2 == 0 else 6
            packets += stream.encode(frame)
        packets += stream.encode()
        for packet in packets:
            if shift_frames:
                # Negative timestamps make the MP4 muxer write an edit list that starts the
                # presentation `shift_frames` frames in: what `ffmpeg -ss ... -c copy` produces.
                step = int(1 / (24 * packet.time_base))
                packet.pts -= shift_frames * step
                packet.dts -= shift_frames * step
            container.mux(packet)
    return path


def test_rotation_is_applied(tmp_path):
    # PyAV's display rotation is counter-clockwise: +90 shows the picture turned left, a
    # clockwise turn of 270 in our convention.
    path = _encode(tmp_path / "rot.mp4", _marker_frames(24, 64, 32), rotation_ccw=90)
    info = probe(path)
    assert (info.width, info.height, info.rotation) == (64, 32, 270)
    assert (info.display_width, info.display_height, info.display_aspect) == (32, 64, 0.5)
    stream = open_frames(path, info)
    frames = _collect(stream)
    assert stream.decoder == "pyav" and frames.shape == (24, 64, 32, 3)
    # Turning left moves the top-left corner to the bottom-left.
    assert frames[0, -8:, :4].mean() > 200 and frames[0, :8, :4].mean() < 60
    small = _frames(path, info, max_side=32)
    assert small.shape == (24, 32, 16, 3) and small[0, -4:, :2].mean() > 200
    np.testing.assert_array_equal(read_span(path, info, 5, 8), frames[5:8])


def test_sample_aspect_ratio_is_applied(tmp_path):
    path = _encode(tmp_path / "sar.mp4", _marker_frames(24, 64, 32), sar="2/1")
    info = probe(path)
    assert info.sample_aspect == 2.0
    assert (info.display_width, info.display_height, info.display_aspect) == (128, 32, 4.0)
    frames = _frames(path, info)
    assert open_frames(path, info).decoder == "pyav"
    assert frames.shape == (24, 32, 128, 3)
    # The marker covered a quarter of the coded width; stretched, still a quarter of the display width.
    assert frames[0, :6, :30].mean() > 200 and frames[0, :6, 36:].mean() < 80


def test_edit_list_trimmed_mp4(tmp_path):
    path = _encode(tmp_path / "trim.mp4", _marker_frames(48, 64, 32), shift_frames=10)
    info = probe(path)
    assert info.frames == 38 == _plain_decode_count(path)
    assert info.duration == pytest.approx(38 / 24)
    stream = open_frames(path, info)
    assert stream.decoder == "decord"  # the plan; decord's padded count then makes it fall back
    frames = _collect(stream)
    # decord would pad the count to 48; the stream must fall back to PyAV and start at frame 10.
    assert stream.decoder == "pyav" and len(frames) == 38
    assert abs(int(frames[0, -4:, -4:, 2].mean()) - 40) <= 6
    np.testing.assert_array_equal(read_span(path, info, 0, 3), frames[:3])
    np.testing.assert_array_equal(read_span(path, info, 30, 38), frames[30:])


def test_variable_frame_rate(tmp_path):
    path = _encode(tmp_path / "vfr.mp4", _marker_frames(48, 64, 32), vfr=True)
    info = probe(path)
    assert info.fps_variable and info.frames == 48
    assert info.fps == pytest.approx(24, rel=0.03)
    stream = open_frames(path, info)
    assert len(_collect(stream)) == 48 and stream.decoder == "pyav"
    np.testing.assert_array_equal(read_span(path, info, 20, 25), _frames(path, info)[20:25])


def test_exif_rotated_jpeg(tmp_path):
    rgb = _marker_frames(1, 80, 40)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # display turned 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    info = probe(path)
    assert (info.width, info.height, info.rotation) == (80, 40, 90)
    assert (info.display_width, info.display_height) == (40, 80)
    (_, shown), = list(open_frames(path, info))
    assert shown.shape == (80, 40, 3)
    assert shown[:8, -8:].mean() > 200 and shown[:8, :8].mean() < 60  # top-left went to top-right
    (_, small), = list(open_frames(path, info, max_side=40))
    assert small.shape == (40, 20, 3)


def test_png_with_alpha_and_webp(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.webp")
    for name, container in (("a.png", "image/png"), ("b.webp", "image/webp")):
        info = probe(tmp_path / name)
        assert info.container == container and info.is_image
        (_, rgb), = list(open_frames(tmp_path / name, info))
        assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# images: every Pillow mode to 8-bit RGB, content before extension, animations as videos


def _still(path: Path) -> np.ndarray:
    info = probe(path)
    assert info.is_image and info.frames == 1, info
    (_, rgb), = list(open_frames(path, info))
    assert rgb.dtype == np.uint8 and rgb.shape == (info.height, info.width, 3)
    return rgb


@pytest.mark.parametrize("ext", ["png", "tiff"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, ext):
    ramp = np.linspace(0, 65535, 96 * 64).round().astype(np.uint16).reshape(64, 96)
    Image.fromarray(ramp).save(tmp_path / f"scan.{ext}")
    rgb = _still(tmp_path / f"scan.{ext}")
    expect = np.round(ramp / 257.0)
    assert np.abs(rgb[..., 0].astype(int) - expect).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all() and (rgb == 255).all(-1).mean() < 0.01


def test_alpha_is_composited_over_mid_gray(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 250
    rgba[:, 20:40, 3] = 128
    rgba[:, 40:, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba).convert("LA").save(tmp_path / "la.png")
    gray = np.asarray(ALPHA_BACKGROUND)
    rgb = _still(tmp_path / "rgba.png").astype(int)
    assert (rgb[:, :20] == gray).all()  # fully transparent: the stated background, not the hidden red
    np.testing.assert_allclose(rgb[:, 20:40], np.broadcast_to(gray + (np.array([250, 0, 0]) - gray) * 128 / 255,
                                                              (40, 20, 3)), atol=1)
    assert (rgb[:, 40:] == (250, 0, 0)).all()
    la = _still(tmp_path / "la.png").astype(int)
    assert (la[:, :20] == gray).all() and abs(la[0, 50, 0] - round(0.299 * 250)) <= 1

    # A palette image whose transparent index is used: those pixels show the background too.
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 16, 32))
    pal.save(tmp_path / "pal.png", transparency=0)
    rgb = _still(tmp_path / "pal.png")
    assert (rgb[:, :16] == gray).all() and (rgb[:, 16:] == (0, 0, 255)).all()


def test_cmyk_and_one_bit_images(tmp_path):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)
    Image.new("CMYK", (40, 30), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=95)
    Image.new("1", (40, 30), 0).save(tmp_path / "black.png")
    assert np.abs(_still(tmp_path / "red.jpg").astype(int) - (255, 0, 0)).max() <= 3
    assert np.abs(_still(tmp_path / "cyan.jpg").astype(int) - (0, 255, 255)).max() <= 3
    assert (_still(tmp_path / "black.png") == 0).all()


def test_content_decides_not_the_extension(tmp_path, sample_dir):
    picture = _marker_frames(1, 64, 48)[0]
    Image.fromarray(picture).save(tmp_path / "avif_bytes.jpg", format="AVIF", quality=90)
    Image.fromarray(picture).save(tmp_path / "jpeg_bytes.mp4", format="JPEG", quality=95)
    Image.fromarray(picture).save(tmp_path / "plain.bmp")
    Image.fromarray(picture).save(tmp_path / "plain.gif")
    for name, container in (("avif_bytes.jpg", "image/avif"), ("jpeg_bytes.mp4", "image/jpeg"),
                            ("plain.bmp", "image/bmp"), ("plain.gif", "image/gif")):
        info = probe(tmp_path / name)
        assert info.container == container and info.is_image and info.frames == 1, (name, info)
        rgb = _still(tmp_path / name)
        assert np.abs(rgb.astype(int) - picture).mean() < 4, name
    # A video named like an image is still the video.
    shutil.copyfile(sample_dir / "cuts.mp4", tmp_path / "video_bytes.png")
    assert probe(tmp_path / "video_bytes.png").frames == probe(sample_dir / "cuts.mp4").frames

    (tmp_path / "notes.png").write_text("not an image at all\n" * 10)
    with pytest.raises(NotMediaError, match="still png picture"):
        probe(tmp_path / "notes.png")
    # An HEIF container (ftyp brand heic) with no HEIF decoder installed: a clear reject.
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    with pytest.raises(UnsupportedFormatError, match="HEIF"):
        probe(tmp_path / "photo.heic")


def _animation(n: int, w: int = 48, h: int = 32) -> list[np.ndarray]:
    """A still background whose top-left square changes colour each frame (delta frames in a GIF)."""
    frames = []
    for i in range(n):
        a = np.full((h, w, 3), (30, 90, 160), np.uint8)
        a[8:16, 8:16] = (20 * i, 255 - 20 * i, 40)
        frames.append(a)
    return frames


@pytest.mark.parametrize("fmt,ext", [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")])
def test_animated_image_is_a_short_video(tmp_path, fmt, ext):
    frames = _animation(12)
    path = tmp_path / f"anim.{ext}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(frames[0]).save(path, format=fmt, save_all=True, duration=100, loop=0,
                                    append_images=[Image.fromarray(f) for f in frames[1:]], **extra)
    info = probe(path)
    assert not info.is_image and info.container == f"image/{ext}"
    assert (info.frames, info.fps, info.duration, info.fps_variable) == (12, pytest.approx(10.0), pytest.approx(1.2), False)
    stream = open_frames(path, info)
    got = _collect(stream)
    assert stream.decoder == "pillow" and got.shape == (12, 32, 48, 3)
    # Every frame is whole (delta frames composited onto the ones before) and in order.
    tol = 8 if fmt == "GIF" else 0  # GIF's 256-colour palette
    assert np.abs(got.astype(int) - np.stack(frames)).max() <= tol
    np.testing.assert_array_equal(read_span(path, info, 5, 9), got[5:9])
    small = _collect(open_frames(path, info, max_side=24))
    assert small.shape == (12, 16, 24, 3)
    analysed = list(iter_analysis(path, info, detect_width=24, max_side=24, keep=lambda i: i % 4 == 0))
    assert [i for i, _, _ in analysed] == list(range(12))
    assert all((rgb is None) == (i % 4 != 0) for i, _, rgb in analysed)
    # Same picture (OpenCV area vs Pillow bicubic shrink: close, not equal).
    assert np.abs(analysed[4][2].astype(int) - small[4]).mean() < 2


def test_animation_timing(tmp_path):
    frames = [Image.fromarray(f) for f in _animation(6)]
    frames[0].save(tmp_path / "zero.gif", save_all=True, append_images=frames[1:], duration=0, loop=0)
    frames[0].save(tmp_path / "uneven.webp", save_all=True, append_images=frames[1:], lossless=True,
                   duration=[40, 40, 200, 40, 40, 40], loop=0)
    zero = probe(tmp_path / "zero.gif")
    assert zero.fps == pytest.approx(10.0) and zero.duration == pytest.approx(0.6)  # 0 ms plays as 100 ms
    uneven = probe(tmp_path / "uneven.webp")
    assert uneven.fps_variable and uneven.duration == pytest.approx(0.4)


def test_animated_gif_and_16_bit_png_through_the_cpu_stage(tmp_path):
    from pipeline.analyze import analyze_video
    from pipeline.scenecut import SceneCutConfig
    from pipeline.settings import DecodeConfig, PrefilterConfig

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (64, 96 * 2, 3), dtype=np.uint8)
    frames = [Image.fromarray(np.ascontiguousarray(texture[:, 2 * i:2 * i + 96])) for i in range(36)]
    frames[0].save(tmp_path / "pan.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    # No prefilter cut-offs: the frames must reach the model stages whatever their scores.
    cfg = (DecodeConfig(), SceneCutConfig(), PrefilterConfig(sharpness_min=None, motion_min=None, motion_max=None,
                                                             overlay_max=None))
    gif = analyze_video(str(tmp_path / "pan.gif"), *cfg)
    assert gif.reject is None and gif.video["frames"] == 36 and not gif.video["is_image"]
    assert gif.clips and all(c.record["fps"] == pytest.approx(10.0) for c in gif.clips)
    scan = analyze_video(str(tmp_path / "scan.png"), *cfg)
    (clip,) = scan.clips
    assert scan.video["is_image"] and (clip.frames == 255).all(-1).mean() < 0.05


# ---------------------------------------------------------------------------------------------
# broken inputs


@pytest.mark.parametrize("kind", sorted(BAD_INPUT_ERRORS))
def test_bad_inputs_raise_the_right_error(bad_inputs, kind):
    path = bad_inputs[kind]
    with pytest.raises(BAD_INPUT_ERRORS[kind]) as err:
        probe(path)
    assert isinstance(err.value, MediaError)
    message = str(err.value)
    assert "expected" in message and str(path) in message, message


def test_bad_input_messages_say_what_came(bad_inputs):
    messages = {}
    for kind, path in bad_inputs.items():
        with pytest.raises(MediaError) as err:
            probe(path)
        messages[kind] = str(err.value)
    assert "0 bytes" in messages["empty"]
    assert "['audio']" in messages["audio_only"]
    assert "8x8" in messages["too_small"]


def test_truncated_and_fake_images(tmp_path, sample_dir):
    data = (sample_dir / "still.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "fake.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path / "tiny.png").write_bytes(b"")
    Image.fromarray(np.zeros((8, 300, 3), np.uint8)).save(tmp_path / "sliver.png")
    with pytest.raises(NotMediaError, match="expected a readable jpeg"):
        probe(tmp_path / "cut.jpg")
    with pytest.raises(NotMediaError, match="expected"):
        probe(tmp_path / "fake.jpg")
    with pytest.raises(MediaError, match="0 bytes"):
        probe(tmp_path / "tiny.png")
    with pytest.raises(UnsupportedSizeError, match="300x8"):
        probe(tmp_path / "sliver.png")


def test_undecodable_frames_fail_the_stream(bad_inputs, sample_dir, tmp_path):
    # Pretend probe passed (same geometry as the intact file): decoding must still refuse it.
    good = tmp_path / "good.mp4"
    good.write_bytes(encode_h264(_marker_frames(24, 64, 32), 24))
    info = replace(probe(good), uri=str(bad_inputs["undecodable"]))
    with pytest.raises(DecodeError, match="expected 24 frames"):
        _frames(bad_inputs["undecodable"], info, backend="pyav")


def test_frame_count_mismatch_is_a_decode_error(sample_dir):
    path = sample_dir / "static.mp4"
    info = probe(path)
    for backend in ("pyav", "auto"):
        wrong = replace(info, frames=info.frames + 5)
        with pytest.raises(DecodeError, match=f"expected {info.frames + 5} frames"):
            _frames(path, wrong, backend=backend)


# ---------------------------------------------------------------------------------------------
# decord failures (decord patched)


class _FailingReader:
    """A decord VideoReader that delivers `good_batches` batches, then fails like decord does."""

    def __init__(self, real, good_batches: int):
        self.real, self.left = real, good_batches

    def __len__(self):
        return len(self.real)

    def get_batch(self, indices):
        from decord._ffi.base import DECORDError

        if self.left == 0:
            raise DECORDError("simulated: Error reading frame")
        self.left -= 1
        return self.real.get_batch(indices)


@pytest.mark.parametrize("good_batches", [0, 1])
def test_decord_failure_falls_back_or_reports(sample_dir, monkeypatch, good_batches):
    decord = pytest.importorskip("decord")
    real_reader = decord.VideoReader
    monkeypatch.setattr(decord, "VideoReader", lambda *a, **kw: _FailingReader(real_reader(*a, **kw), good_batches))
    path = sample_dir / "sharp.mp4"
    info = probe(path)
    stream = open_frames(path, info, max_side=160)
    if good_batches == 0:
        # Nothing yielded yet: PyAV takes over and the caller sees a complete stream.
        frames = _collect(stream)
        assert len(frames) == info.frames and stream.decoder == "pyav"
    else:
        with pytest.raises(DecodeError, match="decord failed after 32"):
            _collect(stream)


def test_frame_and_rate_limits(sample_dir, monkeypatch):
    from pipeline import media

    path = sample_dir / "static.mp4"
    monkeypatch.setattr(media, "MAX_FRAMES", 50)
    with pytest.raises(UnsupportedSizeError, match="at most 50 frames, got 72"):
        probe(path)
    monkeypatch.setattr(media, "MAX_FRAMES", 10_000)
    monkeypatch.setattr(media, "MAX_FPS", 20.0)
    with pytest.raises(UnsupportedSizeError, match=r"frame rate in \(0, 20.0\] fps, got 24"):
        probe(path)


# ---------------------------------------------------------------------------------------------
# decode-ahead thread


def test_prefetch_gives_the_same_frames_and_cleans_up(sample_dir, media_dir):
    import threading

    for path in (sample_dir / "cuts.mp4", media_dir / "stream-of-water.webm"):
        info = probe(path)
        ahead = _collect(open_frames(path, info, max_side=96))
        inline = _collect(open_frames(path, info, max_side=96, prefetch=False))
        np.testing.assert_array_equal(ahead, inline)

        before = threading.active_count()
        stream = iter(open_frames(path, info, max_side=96))
        first = [next(stream) for _ in range(3)]
        assert [i for i, _ in first] == [0, 1, 2]
        stream.close()  # a consumer that stops early must not leave a decoder thread behind
        assert threading.active_count() == before


# ---------------------------------------------------------------------------------------------
# salvage: a decode that fails part-way keeps what decoded cleanly


def _gop15(path: Path, n: int, *, faststart: bool = False) -> Path:
    """A panning noise texture, H.264 with a keyframe every 15 frames (single-threaded: same bytes each run)."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (120, 160 + 2 * n, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=30,
                                      options={"x264-params": "keyint=15:min-keyint=15:scenecut=0:mbtree=0"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(n):
            rgb = np.ascontiguousarray(texture[:, 2 * i:2 * i + 160])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def _zero_packet(src: Path, dst: Path, frame: int) -> Path:
    """Copy ``src`` with the payload of display frame ``frame``'s packet zeroed (what a bad sector does)."""
    with av.open(str(src)) as container:
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size)
    _, pos, size = packets[frame]
    data = bytearray(src.read_bytes())
    data[pos:pos + size] = bytes(size)
    dst.write_bytes(bytes(data))
    return dst


def _analysis(path: Path, info, damage, threads: int = 0):
    return {i: rgb for i, _, rgb in iter_analysis(path, info, detect_width=64, max_side=160, keep=lambda i: True,
                                                  damage=damage, threads=threads)}


# One decoder thread (what these small frames get by default) and FFmpeg's frame threads, which report a lost packet
# frames later: the same frames are lost and kept either way.
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("lost", [100, 121, 128])
def test_damaged_middle_keeps_the_frames_that_decode_cleanly(tmp_path, lost, threads):
    clean = _gop15(tmp_path / "clean.mp4", 240)
    path = _zero_packet(clean, tmp_path / "damaged.mp4", lost)
    info = probe(path)
    assert info.frames == 240  # the index is intact: probe counts every frame
    with pytest.raises(DecodeError, match="expected 240 frames"):  # the strict decode still refuses it
        list(iter_analysis(path, info, detect_width=64, max_side=160, keep=lambda i: True))

    damage: list[tuple[int, int]] = []
    got = _analysis(path, info, damage, threads)
    (start, end), = damage
    # The lost frame and everything up to the next keyframe (frames decoded from concealed data) are out.
    assert start <= lost < end and end % 15 == 0 and end - start <= 30
    assert sorted(got) == [i for i in range(240) if not start <= i < end]
    # What is kept is exactly what the intact file decodes to at those indices.
    ref = _analysis(clean, probe(clean), [])
    for i in got:
        np.testing.assert_array_equal(got[i], ref[i], err_msg=f"frame {i}")


@pytest.mark.parametrize("threads", [1, 3])
def test_truncated_file_with_its_index_keeps_the_head(tmp_path, threads):
    whole = _gop15(tmp_path / "whole.mp4", 90, faststart=True)  # moov first: the index survives the cut
    data = whole.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) * 3 // 5])
    info = probe(path)
    damage: list[tuple[int, int]] = []
    got = _analysis(path, info, damage, threads)
    assert damage and damage[-1][1] == info.frames and len(damage) == 1
    assert sorted(got) == list(range(damage[0][0])) and len(got) > 30
    ref = _analysis(whole, probe(whole), [])
    for i in got:
        np.testing.assert_array_equal(got[i], ref[i])


def test_nothing_decodable_is_still_an_error(bad_inputs):
    path = bad_inputs["undecodable"]
    with pytest.raises(DecodeError):
        info = probe(path)
        list(iter_analysis(path, info, detect_width=64, max_side=160, keep=lambda i: True, damage=[]))


def test_cpu_stage_keeps_the_clips_around_the_damage(tmp_path):
    from pipeline.analyze import analyze_video
    from pipeline.scenecut import SceneCutConfig
    from pipeline.settings import DecodeConfig, PrefilterConfig

    clean = _gop15(tmp_path / "clean.mp4", 240)
    path = _zero_packet(clean, tmp_path / "damaged.mp4", 121)
    res = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    assert res.reject is None, res.reject
    (start, end), = res.damaged_frames
    assert start <= 121 < end and res.video["frames"] == 240 - (end - start)
    spans = [(c.record["start_frame"], c.record["end_frame"]) for c in res.clips]
    assert any(e <= start for _, e in spans) and any(s >= end for s, _ in spans), spans
    assert all(e <= start or s >= end for s, e in spans), spans  # no clip covers a damaged frame
    intact = analyze_video(str(clean), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    assert intact.damaged_frames == [] and intact.video["frames"] == 240
