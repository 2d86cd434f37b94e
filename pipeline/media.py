"""Media I/O: probe a file once, then decode its frames once, downscaled inside the decoder.

``probe`` reads metadata from the container (PyAV) or the image header (Pillow) and counts the
frames a decoder will actually produce: MP4 edit lists are honoured (packets flagged *discard* are
not frames) and VP8/VP9 invisible frames, which share a timestamp with the next shown frame, are
counted once. ``open_frames`` streams every frame in display orientation; it uses decord only where
decord is known to be right (plain CFR MP4/MOV H.264/HEVC whose frame count agrees with PyAV's) and
PyAV everywhere else. ``read_span`` seeks near a span so shard cutting never decodes a whole file.

What a file is comes from its bytes, never its name: image signatures (JPEG, PNG, GIF, WebP, AVIF,
HEIF, BMP, TIFF) go to Pillow, everything else to FFmpeg, and a file FFmpeg only sees as one still
picture (a text file named ``.png``, an image format Pillow does not read) is a ``NotMediaError``, not
a one-frame video. Every Pillow mode becomes 8-bit RGB the same way: 16-bit samples are scaled
(``v / 257``), not clipped; alpha is composited "over" ``ALPHA_BACKGROUND`` (mid-gray); CMYK, palette,
1-bit and YCbCr images are converted by Pillow. An animated GIF, PNG (APNG), WebP or AVIF is a short
*video* (``is_image`` False, ``container`` ``image/<format>``) that Pillow decodes frame by frame: its
frame durations give ``fps`` (a duration of 10 ms or less plays as 100 ms, as browsers do) and EXIF
orientation is honoured for still images only.

Odd sizes (an 853x480 VP9, a 161x121 MPEG-4) are decoded at their true size: 4:2:0 chroma planes of an
odd side hold ``ceil(side / 2)`` samples, and no pixel is cropped. ``output_size`` is therefore odd
for such a source when it is not downscaled.

A video whose decode fails part-way (a damaged stretch, a truncated tail) can be salvaged by the
curation decode (``iter_analysis(..., damage=[])``): it yields only the frames that decoded cleanly,
named by their timestamps, drops those decoded from concealed data up to the next keyframe, and
reports the damaged ranges. ``open_frames`` and ``read_span`` stay strict (every frame, or an error).

Every failure caused by the input itself raises a ``MediaError`` subclass whose message says what
was expected and what came; the pipeline turns those into ``rejects`` rows. ``probe`` and every decode
also turn anything else a decoder or library raises for one input (an ``AssertionError`` in PyAV, a
``struct.error`` in a Pillow plugin, ...) into an ``UnexpectedMediaError`` naming the original class and
message, so one input can never stop a run; only argument errors of the caller stay ``ValueError``.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

# Limits for "absurd" inputs. A side under 16 px cannot fill the smallest 16x16 bucket; over 16384 px
# is beyond what any encoder here produces and a likely decompression bomb.
MIN_SIDE = 16
MAX_SIDE = 16384
MAX_FRAMES = 2_000_000  # ~18.5 h at 30 fps: longer inputs are almost certainly broken timestamps
MAX_FPS = 1000.0

# Containers and codecs decord 0.6 handles correctly; it mis-handles VFR, webm and edit lists.
_DECORD_CONTAINERS = ("mp4", "mov")
_DECORD_CODECS = ("h264", "hevc")
_DECORD_BATCH = 32

# Decode-ahead depth of open_frames: at most this many frames and about this many bytes.
_PREFETCH_FRAMES = 64
_PREFETCH_BYTES = 64 << 20
# Frames handed between the curation decode's threads at a time (bench/curate_cpu.py's clip: 8 a hand-over instead
# of 1 took 0.68-0.74 s a run instead of 0.71-0.80, 4 alternating rounds of 3).
_HANDOFF_CHUNK = 8
# swscale threads per RGB conversion. PyAV's default (0, one per CPU) builds a fresh scaler, and with it fresh threads,
# for every frame converted: on bench/curate_cpu.py's clip that is ~250 threads started and ended a video, 90 us of
# CPU a kept frame, and the CPU stage ran 2 % slower (10 paired runs). The conversion is the same pixel for pixel.
_SWS_THREADS = 1

# The curation decode (iter_analysis, threads=0) decodes frames up to this many coded pixels in one thread and larger
# ones with FFmpeg's frame threads. Frame threads cost 5-8 % more CPU for the same frames (copied decoder state, hand-
# overs), and below this size the decode is no longer the bulk of a frame's work: the conversions, scene cut and
# scorers (all at <= 384 px) keep the other core busy. Measured with analyze_video, 4-8 alternating runs of each on
# 2 cores: one thread took 0.875-0.98 of the wall time on the long clips here at 640x360 to 854x480 (bench clip,
# bottle-detection, one-by-one-person-detection, car-detection; generated 768x432 and 854x480) and 1.01-1.07 on the
# short ones (friday, again, stream-of-water: 3-6 s, one scene, nothing to score until the end), 9 % less in total;
# at 960x540 and above frame threads win (one thread: 1.14 at 960x540, 1.15 at 720p, 1.31 at 1080p).
SINGLE_THREAD_MAX_PIXELS = 480_000

# A frame duration more than this far from the median marks the stream as variable frame rate.
_VFR_TOLERANCE = 0.1
# ... unless fewer than this share of the durations deviate (one dropped frame is not VFR).
_VFR_MIN_SHARE = 0.01

# A declared constant rate within this of the measured one replaces it (timestamps are rounded).
_RATE_AGREEMENT = 0.01

# First packets decoded by probe to prove frames come out at all (a few GOPs of any real stream).
_PROBE_DECODE_PACKETS = 300

_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
# ISO-BMFF `ftyp` brands of still/animated images (MP4 and MOV files carry other brands).
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
# BITMAPINFOHEADER sizes that follow a BMP's "BM": two letters alone are too weak a signature.
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}
_HEAD_BYTES = 64

# Pillow modes ``_pil_rgb`` turns into 8-bit RGB (LAB and the rarer planar modes are refused at probe).
_PIL_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBa", "RGBX", "LA", "La", "PA", "CMYK", "YCbCr", "HSV",
              "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# Transparent pixels are shown over mid-gray: neither black nor white, so a cut-out logo keeps its
# contrast whichever way it was drawn, and sharpness/overlay scores see no artificial hard edge.
ALPHA_BACKGROUND = (128, 128, 128)
# Browsers play a GIF frame delay of 10 ms or less (often 0: "as fast as possible") as 100 ms.
_MIN_FRAME_MS = 10
_DEFAULT_FRAME_MS = 100
# EXIF orientation -> clockwise degrees to display (mirrored variants keep their rotation part),
# and the transpose that displays it (applied after downscaling, so on the small picture).
_EXIF_ROTATION = {1: 0, 2: 0, 3: 180, 4: 180, 5: 90, 6: 90, 7: 270, 8: 270}
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class MediaError(Exception):
    """An input that cannot be processed; the message says what was expected and what came."""


class EmptyFileError(MediaError):
    """The file has zero bytes."""


class NotMediaError(MediaError):
    """Not a recognised container or image (text named .mp4, truncated header, ...)."""


class NoVideoStreamError(MediaError):
    """A container without a video stream (audio only, subtitles, ...)."""


class DecodeError(MediaError):
    """The container opens but its frames do not decode, or fewer/more come out than counted."""


class UnsupportedSizeError(MediaError):
    """Absurd geometry or timing: side < 16 or > 16384 px, too many frames, non-positive fps."""


class UnsupportedFormatError(NotMediaError):
    """A recognised image format or pixel mode that the decoders here cannot read (HEIF without a plugin, LAB)."""


class UnexpectedMediaError(MediaError):
    """A decoder or library raised something other than a MediaError for this input; the message starts
    with the original exception's class and message (the original is chained as ``__cause__``)."""


def _unexpected(err: Exception, what: str, path: Path) -> UnexpectedMediaError:
    return UnexpectedMediaError(f"{type(err).__name__}: {err} (expected {what} to succeed or raise a "
                                f"MediaError): {path}")


def _guarded(source: Iterator, what: str, path: Path) -> Iterator:
    """``source``, with any non-MediaError it raises turned into an ``UnexpectedMediaError``."""
    try:
        yield from source
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - one input's failure, whatever its class, must stay that input's
        raise _unexpected(e, what, path) from e


def content_hash(path: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of the file bytes: the ``video_id``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class MediaInfo:
    """What ``probe`` learned about one file. Columns of ``catalog.schema.VIDEOS`` by the same names.

    ``rotation`` is the clockwise turn (0/90/180/270) applied to the coded picture for display
    (the legacy ``rotate`` tag convention: a portrait phone video is usually 90).
    ``fps`` is ``frames / duration`` (None for still images), ``frames`` what a decoder yields.
    """

    video_id: str
    uri: str
    bytes: int
    container: str
    codec: str
    width: int
    height: int
    rotation: int
    sample_aspect: float
    display_width: int
    display_height: int
    display_aspect: float
    fps: float | None
    fps_variable: bool
    frames: int
    duration: float
    has_audio: bool
    is_image: bool
    probe_seconds: float

    def to_row(self) -> dict:
        """Row for the ``videos`` table (the columns probe knows; run and scene columns are added later)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# probe


def probe(path: str | Path, *, video_id: str | None = None, max_pixels: int | None = None) -> MediaInfo:
    """Read a video's or image's metadata and count its decodable frames.

    Args:
        path: a video or image file.
        video_id: ``content_hash(path)`` when the caller already has it (saves reading the file twice).
        max_pixels: a video (or animated image) whose coded frame has more pixels is an ``UnsupportedSizeError``
            before any frame is decoded; None: only the per-side limits.

    Raises:
        EmptyFileError, NotMediaError, NoVideoStreamError, DecodeError, UnsupportedSizeError.
    """
    t0 = time.perf_counter()
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise EmptyFileError(f"expected a video or image file, got 0 bytes: {path}")
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
        if video_id is None:
            video_id = content_hash(path)
        image_format = _sniff_image(head)
        if image_format == "jpeg" and _is_jpeg_stream(path):
            image_format = None  # a raw MJPEG stream: JPEG pictures back to back are a video, not a photo
        if image_format is not None:
            fields = _probe_image(path, image_format)
        else:
            fields = _probe_video(path, head, max_pixels)
        if max_pixels is not None and not fields["is_image"] and fields["width"] * fields["height"] > max_pixels:
            raise UnsupportedSizeError(f"expected video frames of at most {max_pixels} pixels, got "
                                       f"{fields['width']}x{fields['height']}: {path}")
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - see _guarded
        raise _unexpected(e, "probe", path) from e
    return MediaInfo(video_id=video_id, uri=str(path), bytes=size,
                     probe_seconds=time.perf_counter() - t0, **fields)


def _sniff_image(head: bytes) -> str | None:
    """The image format the first bytes announce, or None (a video container, or not media at all)."""
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        # Major brand, then the compatible brands up to the end of the ftyp box.
        box = min(int.from_bytes(head[:4], "big"), len(head))
        brands = {head[8:12]} | {head[i:i + 4] for i in range(16, box - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    return None


def _display_geometry(width: int, height: int, rotation: int, sar: float) -> tuple[int, int]:
    # Sample aspect stretches the width (ffmpeg's `scale=iw*sar:ih`); rotation by 90/270 swaps sides.
    dw, dh = max(1, round(width * sar)), height
    if rotation in (90, 270):
        dw, dh = dh, dw
    return dw, dh


def _check_size(path: Path, width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        raise UnsupportedSizeError(
            f"expected each side in [{MIN_SIDE}, {MAX_SIDE}] px, got {width}x{height}: {path}")


def _probe_image(path: Path, image_format: str) -> dict:
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
            _check_size(path, width, height)
            if img.mode not in _PIL_MODES:
                raise UnsupportedFormatError(f"expected an image in one of the Pillow modes {sorted(_PIL_MODES)}, "
                                             f"got a {image_format} in mode {img.mode!r}: {path}")
            frames = int(getattr(img, "n_frames", 1)) if getattr(img, "is_animated", False) else 1
            if frames > MAX_FRAMES:
                raise UnsupportedSizeError(f"expected at most {MAX_FRAMES} frames, got {frames}: {path}")
            # Every frame is loaded: a truncated or corrupt payload fails here, not later in a decode stage.
            durations = _frame_durations(img, frames) if frames > 1 else None
            if durations is None:
                img.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise UnsupportedSizeError(f"expected at most {Image.MAX_IMAGE_PIXELS} pixels, Pillow said {e}: {path}") from e
    except Image.UnidentifiedImageError as e:
        if image_format == "heif":
            raise UnsupportedFormatError(f"expected an image format Pillow here reads, got HEIF/HEIC (no HEIF "
                                         f"decoder such as pillow-heif is installed): {path}") from e
        raise NotMediaError(f"expected a readable {image_format} image, Pillow could not identify it: {path}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise NotMediaError(f"expected a readable {image_format} image, Pillow said {e!r}: {path}") from e
    if durations is not None:
        return _animated_fields(image_format, width, height, durations)
    rotation = _EXIF_ROTATION.get(int(orientation), 0)
    dw, dh = _display_geometry(width, height, rotation, 1.0)
    return dict(container=f"image/{image_format}", codec=image_format, width=width, height=height,
                rotation=rotation, sample_aspect=1.0, display_width=dw, display_height=dh,
                display_aspect=dw / dh, fps=None, fps_variable=False, frames=1, duration=0.0,
                has_audio=False, is_image=True)


def _frame_durations(img: Image.Image, frames: int) -> np.ndarray:
    """Display time of each frame of an animated image in seconds, loading (so checking) every frame."""
    ms = np.empty(frames)
    for i in range(frames):
        img.seek(i)
        img.load()  # WebP reports a frame's duration once it is loaded
        d = img.info.get("duration") or 0
        ms[i] = _DEFAULT_FRAME_MS if d <= _MIN_FRAME_MS else d
    return ms / 1000.0


def _animated_fields(image_format: str, width: int, height: int, durations: np.ndarray) -> dict:
    duration = float(durations.sum())
    frames = len(durations)
    step = float(np.median(durations))
    fps_variable = bool((np.abs(durations - step) > _VFR_TOLERANCE * step).mean() > _VFR_MIN_SHARE)
    return dict(container=f"image/{image_format}", codec=image_format, width=width, height=height,
                rotation=0, sample_aspect=1.0, display_width=width, display_height=height,
                display_aspect=width / height, fps=frames / duration, fps_variable=fps_variable,
                frames=frames, duration=duration, has_audio=False, is_image=False)


def _is_animated_image(info: MediaInfo) -> bool:
    """An animated GIF/PNG/WebP/AVIF: a video that Pillow decodes."""
    return not info.is_image and info.container.startswith("image/")


def analysis_decoder(info: MediaInfo) -> str:
    """The decoder ``iter_analysis`` uses for this file (the ``videos.decoder`` value): pyav or pillow."""
    return "pillow" if _is_animated_image(info) else "pyav"


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as e:
        raise NotMediaError(
            f"expected a video container or image, FFmpeg could not open it ({e}): {path}") from e


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    # Cover art in audio files is a one-picture "video" stream flagged attached_pic: not a video.
    attached = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not (s.disposition & attached)]
    if not streams:
        kinds = [s.type for s in container.streams] or ["none"]
        raise NoVideoStreamError(f"expected a video stream, found streams {kinds}: {path}")
    return streams[0]


def _container_name(format_name: str, path: Path) -> str:
    # FFmpeg names demuxers by family ("mov,mp4,m4a,3gp,3g2,mj2"); report the member the file claims.
    names = format_name.split(",")
    ext = path.suffix.lower().lstrip(".")
    alias = {"mkv": "matroska", "m4v": "mp4", "qt": "mov"}.get(ext, ext)
    return alias if alias in names else names[0]


def _frame_timestamps(container: av.container.InputContainer, stream: av.VideoStream,
                      path: Path) -> list[int] | None:
    """Sorted distinct timestamps of the frames a decoder will output; None when the stream has none.

    Packets flagged discard (before an MP4 edit list's start) decode to nothing. VP8/VP9 invisible
    frames are stored as their own packet with the timestamp of the next shown frame, so distinct
    timestamps, not packets, are frames.
    """
    stamps: list[int] = []
    missing = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                missing += 1
            else:
                stamps.append(ts)
    except av.FFmpegError as e:
        if not stamps:
            raise DecodeError(f"expected readable video packets, demuxing failed at once ({e}): {path}") from e
        # A truncated tail: count what can be read; open_frames will produce exactly these frames.
    if missing:
        return None
    return sorted(set(stamps))


def _count_decoded(path: Path) -> int:
    container = _open_container(path)
    with container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        return sum(1 for _ in _decode_tolerant(container, stream))


def _first_frame(path: Path) -> av.VideoFrame:
    """Decode the first frame (proves the stream decodes; carries the display matrix)."""
    container = _open_container(path)
    errors: list[str] = []
    with container:
        stream = _video_stream(container, path)
        packets = 0
        for packet in container.demux(stream):
            if packet.size == 0:
                break
            packets += 1
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                errors.append(str(e))
                frames = []
            if frames:
                return frames[0]
            if packets >= _PROBE_DECODE_PACKETS:
                break
        try:
            frames = stream.codec_context.decode(None)  # flush: decoders hold back reordered frames
        except av.FFmpegError as e:
            errors.append(str(e))
            frames = []
        if frames:
            return frames[0]
    detail = f"; decoder errors: {errors[:3]}" if errors else ""
    raise DecodeError(f"expected decodable video frames, none came from the first {packets} packets{detail}: {path}")


def _is_jpeg_stream(path: Path) -> bool:
    """Whether a file that starts like a JPEG is a raw MJPEG stream: FFmpeg's JPEG pipe demuxer finds two or more
    pictures in it that decode at the same size (an embedded EXIF thumbnail would decode smaller).

    Decided by the decoded stream, not by the name (webcams and capture tools write such streams as ``.avi`` or
    ``.mjpeg``); the pipe demuxer times them at FFmpeg's default 25 fps, as ``ffplay`` plays them.
    """
    try:
        with av.open(str(path), format="jpeg_pipe", metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            packets = []
            for packet in container.demux(stream):  # a photo is one packet: nothing is decoded for it
                if packet.size:
                    packets.append(packet)
                if len(packets) == 2:
                    break
            if len(packets) < 2:
                return False
            sizes = [(f.width, f.height) for p in packets for f in p.decode()]
            return len(sizes) >= 2 and sizes[0] == sizes[1]
    except (av.FFmpegError, IndexError):
        return False  # FFmpeg does not read it as pictures at all: Pillow's verdict stands
    return False


def _is_still_demuxer(format_name: str) -> bool:
    # FFmpeg's image demuxers: image2 (chosen by a file's extension) and the per-format *_pipe probes.
    return format_name == "image2" or format_name.endswith("_pipe")


def _probe_video(path: Path, head: bytes, max_pixels: int | None = None) -> dict:
    container = _open_container(path)
    with container:
        stream = _video_stream(container, path)
        cc = stream.codec_context
        codec = cc.name
        width, height = cc.width, cc.height
        format_name = container.format.name
        if _is_still_demuxer(format_name) and not (codec == "mjpeg" and _is_jpeg_stream(path)):
            # Not one of the image signatures Pillow reads (checked before), so not an image we decode;
            # and a still picture is not a one-frame video.
            raise NotMediaError(
                f"expected a video container or a JPEG/PNG/GIF/WebP/AVIF/BMP/TIFF image, got bytes starting "
                f"{head[:12]!r} that FFmpeg reads only as a still {codec} picture ({format_name} demuxer): {path}")
        has_audio = len(container.streams.audio) > 0
        sar_raw = stream.sample_aspect_ratio or cc.sample_aspect_ratio
        time_base = stream.time_base
        rate = stream.average_rate or stream.guessed_rate
        container_duration = container.duration
        stamps = _frame_timestamps(container, stream, path)
    if width <= 0 or height <= 0:
        # FFmpeg guesses demuxers by extension too (image2 for .jpg), then finds no picture in the bytes.
        raise NotMediaError(f"expected a {codec} stream with a picture size, the {format_name} demuxer "
                            f"found {width}x{height}: {path}")
    _check_size(path, width, height)
    if max_pixels is not None and width * height > max_pixels:  # before _first_frame decodes one at full size
        raise UnsupportedSizeError(f"expected video frames of at most {max_pixels} pixels, got {width}x{height}: "
                                   f"{path}")
    first = _first_frame(path)
    rotation = int(round(-(first.rotation or 0))) % 360  # frame.rotation is counter-clockwise
    if rotation not in (0, 90, 180, 270):
        raise UnsupportedSizeError(f"expected a display rotation of 0/90/180/270 degrees, got {rotation}: {path}")
    sar = float(sar_raw) if sar_raw else 1.0
    if not 0.1 <= sar <= 10.0:
        raise UnsupportedSizeError(f"expected a sample aspect ratio in [0.1, 10], got {sar}: {path}")

    fps_variable = False
    fps = None
    if stamps is not None and time_base is not None:
        frames = len(stamps)
        if frames == 0:
            raise DecodeError(f"expected video frames, the stream has no packets: {path}")
        deltas = np.diff(np.asarray(stamps, dtype=np.int64))
        if len(deltas):
            # The last frame's own duration is often unrecorded: it lasts the mean one.
            duration = float((stamps[-1] - stamps[0]) * frames / (frames - 1) * time_base)
            # One tick of slack: 29.97 fps in a 1/1000 time base alternates 33 and 34 ms.
            step = float(np.median(deltas))
            off = np.abs(deltas - step) > _VFR_TOLERANCE * step + 1
            fps_variable = bool(off.mean() > _VFR_MIN_SHARE)
            if not fps_variable and rate and abs(frames / duration / float(rate) - 1) < _RATE_AGREEMENT:
                # Millisecond time bases round 30 fps to 33/34 ms steps; the declared rate is exact.
                fps = float(rate)
                duration = frames / fps
        else:
            duration = 1 / float(rate) if rate else 0.0
    else:
        # No timestamps (raw elementary streams): only a full decode tells the count.
        frames = _count_decoded(path)
        if frames == 0:
            raise DecodeError(f"expected video frames, none decoded: {path}")
        if rate:
            duration = frames / float(rate)
        elif container_duration:
            duration = container_duration / av.time_base
        else:
            raise UnsupportedSizeError(f"expected a frame rate or duration, the file has neither: {path}")
    if frames > MAX_FRAMES:
        raise UnsupportedSizeError(f"expected at most {MAX_FRAMES} frames, got {frames}: {path}")
    if fps is None:
        fps = frames / duration if duration > 0 else 0.0
    if not 0 < fps <= MAX_FPS:
        raise UnsupportedSizeError(
            f"expected a frame rate in (0, {MAX_FPS}] fps, got {fps:.3g} ({frames} frames in {duration:.3g} s): {path}")

    dw, dh = _display_geometry(width, height, rotation, sar)
    return dict(container=_container_name(format_name, path), codec=codec, width=width, height=height,
                rotation=rotation, sample_aspect=sar, display_width=dw, display_height=dh,
                display_aspect=dw / dh, fps=fps, fps_variable=fps_variable, frames=frames,
                duration=duration, has_audio=has_audio, is_image=False)


# ---------------------------------------------------------------------------------------------
# decoding


def output_size(info: MediaInfo, max_side: int | None) -> tuple[int, int]:
    """(width, height) of the frames ``open_frames``/``read_span`` return for ``max_side``.

    The display size when it fits; otherwise scaled so the longer side is ``max_side``, each side
    rounded to an even number (encoders want even sides).
    """
    dw, dh = info.display_width, info.display_height
    if max_side is None or max(dw, dh) <= max_side:
        return dw, dh
    if max_side < 2:
        raise ValueError(f"expected max_side >= 2, got {max_side}")
    scale = max_side / max(dw, dh)

    def even(side: int) -> int:
        v = max(2, 2 * round(side * scale / 2))
        return v - 2 if v > max_side else v  # an odd max_side must not round up past itself

    return even(dw), even(dh)


def _coded_target(info: MediaInfo, max_side: int | None) -> tuple[int, int]:
    # Scaling happens before the rotation is applied, so a 90/270 turn swaps the target sides.
    w, h = output_size(info, max_side)
    return (h, w) if info.rotation in (90, 270) else (w, h)


def _to_display(rgb: np.ndarray, rotation: int) -> np.ndarray:
    # np.rot90 turns counter-clockwise; rotation is clockwise.
    if rotation == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=-(rotation // 90)))


def _decord_eligible(info: MediaInfo) -> bool:
    return (not info.is_image and info.container in _DECORD_CONTAINERS and info.codec in _DECORD_CODECS
            and info.rotation == 0 and abs(info.sample_aspect - 1.0) < 1e-6 and not info.fps_variable)


class FrameStream:
    """Every frame of one file in order: iterate for ``(frame_index, rgb)`` with rgb ``(H, W, 3)`` uint8.

    Each iteration decodes afresh. ``decoder`` names the decoder that produced (or, before
    iterating, will produce) the frames: ``decord``, ``pyav`` or ``pillow``; it turns to ``pyav``
    when decord fails before its first frame.

    With ``prefetch`` on, a background thread decodes ahead while the consumer works on earlier
    frames: decord and PyAV release the GIL while decoding and scaling, so decode overlaps with
    scene cutting and scoring on another core.
    """

    def __init__(self, path: Path, info: MediaInfo, *, max_side: int | None, backend: str,
                 prefetch: bool = True) -> None:
        self.path = path
        self.info = info
        self.max_side = max_side
        self.prefetch = prefetch
        self.width, self.height = output_size(info, max_side)
        if info.is_image or _is_animated_image(info):
            self.decoder = "pillow"
        elif backend == "auto":
            self.decoder = "decord" if _decord_eligible(info) else "pyav"
        else:
            self.decoder = backend

    def __len__(self) -> int:
        return self.info.frames

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        source = _guarded(self._decode(), "decoding", self.path)
        if not self.prefetch or self.info.is_image:
            return source
        depth = max(2, min(_PREFETCH_FRAMES, _PREFETCH_BYTES // (self.width * self.height * 3)))
        return _prefetched(source, depth, name=f"decode {self.path.name}")

    def _decode(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.decoder == "pillow":
            if self.info.is_image:
                yield 0, _read_image(self.path, self.info, self.max_side)
            else:
                yield from _iter_animated(self.path, self.info, output_size(self.info, self.max_side))
            return
        if self.decoder == "decord":
            produced = 0
            try:
                for item in _iter_decord(self.path, self.info, self.max_side):
                    produced += 1
                    yield item
                return
            except _DecordFailure as e:
                if produced:
                    raise DecodeError(f"expected {self.info.frames} frames, decord failed after "
                                      f"{produced} ({e}): {self.path}") from e
                # decord is an accelerator, not a requirement: fall back while nothing was yielded.
                self.decoder = "pyav"
        yield from _iter_pyav(self.path, self.info, self.max_side)


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def _prefetched(source: Iterator, depth: int, *, name: str, chunk: int = 1) -> Iterator:
    """Run ``source`` in a daemon thread, ``depth`` items ahead; errors re-raise in order.

    ``chunk`` items travel through the queue together: each hand-over takes the queue's lock and wakes the
    other thread, which per small frame costs as much GIL time as the frame's own conversions."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth // chunk))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        batch: list = []
        try:
            for item in source:
                batch.append(item)
                if len(batch) >= chunk:
                    if not put(batch):
                        return
                    batch = []
            if batch and not put(batch):
                return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            if not batch or put(batch):  # what came before the error is delivered first
                put(_Raised(e))
        finally:
            source.close()

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield from item
    finally:
        # The consumer stopped early (or finished): let the worker see it and close the decoder.
        stop.set()
        # A generator dropped with an exception's traceback is closed by whichever thread's garbage collection
        # frees it, which can be the worker itself: it sees `stop` and ends without being waited for.
        if worker is not threading.current_thread():
            worker.join()


def open_frames(path: str | Path, info: MediaInfo, *, max_side: int | None = None,
                backend: str = "auto", prefetch: bool = True) -> FrameStream:
    """Stream every frame in display orientation, downscaled inside the decoder.

    Args:
        path: the probed file.
        info: ``probe(path)``.
        max_side: longer side of the output; None keeps the display size.
        backend: ``auto`` (decord for plain CFR MP4/MOV H.264/HEVC, PyAV otherwise), ``decord`` or ``pyav``.
        prefetch: decode ahead in a background thread (overlaps decoding with the consumer's work).

    Iterating raises ``DecodeError`` when the frames do not decode or their count differs from
    ``info.frames``.
    """
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"expected backend 'auto', 'decord' or 'pyav', got {backend!r}")
    if backend == "decord" and not _decord_eligible(info):
        raise ValueError(
            f"expected a constant-rate, unrotated, square-pixel {'/'.join(_DECORD_CONTAINERS)} "
            f"{'/'.join(_DECORD_CODECS)} video for the decord backend, got {info.container}/{info.codec} "
            f"(rotation {info.rotation}, sample aspect {info.sample_aspect:.3g}, variable fps "
            f"{info.fps_variable}): {path}")
    return FrameStream(Path(path), info, max_side=max_side, backend=backend, prefetch=prefetch)


def _read_image(path: Path, info: MediaInfo, max_side: int | None) -> np.ndarray:
    w, h = _coded_target(info, max_side)
    try:
        with Image.open(path) as img:
            orientation = int(img.getexif().get(0x0112, 1))
            if (w, h) != img.size:
                img.draft("RGB", (w, h))  # JPEG: DCT-domain downscale by 1/2, 1/4, 1/8 while decoding
            return _pil_array(img, (w, h), _EXIF_TRANSPOSE.get(orientation))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"expected a decodable image, Pillow said {e!r}: {path}") from e


def _pil_rgb(img: Image.Image) -> Image.Image:
    """Any mode in ``_PIL_MODES`` as 8-bit RGB: 16-bit samples scaled, alpha composited on ALPHA_BACKGROUND."""
    mode = img.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # Pillow's own convert clips these at 255 (a 16-bit scan turns white); scale 0..65535 to 0..255.
        # Mode I comes from 16-bit PNG/TIFF grayscale here, so its range is 16-bit too.
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        mode = "L"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # premultiplied modes are un-premultiplied, palette/tRNS keys expanded
        canvas = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _pil_array(img: Image.Image, size: tuple[int, int], transpose: Image.Transpose | None) -> np.ndarray:
    """The current frame of ``img`` as (H, W, 3) uint8 RGB at coded-orientation ``size``, then transposed."""
    img = _pil_rgb(img)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if transpose is not None:
        img = img.transpose(transpose)
    return np.asarray(img, dtype=np.uint8).copy()


def _iter_animated(path: Path, info: MediaInfo, size: tuple[int, int], start: int = 0,
                   end: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Frames ``[start, end)`` of an animated image as ``(index, rgb)`` at ``size`` (composited by Pillow)."""
    end = info.frames if end is None else end
    try:
        with Image.open(path) as img:
            got = int(getattr(img, "n_frames", 1))
            if got != info.frames:
                raise DecodeError(f"expected {info.frames} frames (probe's count), Pillow counts {got}: {path}")
            for index in range(start, end):
                img.seek(index)  # Pillow replays the frames before `index` itself where disposal needs them
                yield index, _pil_array(img, size, None)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"expected {info.frames} decodable frames, Pillow said {e!r}: {path}") from e


class _DecordFailure(Exception):
    """decord could not deliver this file (or disagrees with PyAV about it)."""


def _iter_decord(path: Path, info: MediaInfo, max_side: int | None) -> Iterator[tuple[int, np.ndarray]]:
    try:
        import decord  # imported lazily: only the processes that decode pay for it
        from decord._ffi.base import DECORDError
    except ImportError as e:
        raise _DecordFailure(f"decord is not importable ({e})") from e

    w, h = output_size(info, max_side)
    size = {} if (w, h) == (info.width, info.height) else {"width": w, "height": h}
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), **size)
        n = len(reader)
    except (DECORDError, RuntimeError) as e:
        raise _DecordFailure(f"decord could not open the file ({e})") from e
    if n != info.frames:
        # decord 0.6 ignores edit lists and pads trimmed files; PyAV's count is the truth.
        raise _DecordFailure(f"decord counts {n} frames, PyAV {info.frames}")
    for start in range(0, n, _DECORD_BATCH):
        try:
            batch = reader.get_batch(list(range(start, min(n, start + _DECORD_BATCH)))).asnumpy()  # (B, H, W, 3)
        except (DECORDError, RuntimeError) as e:
            raise _DecordFailure(f"decord failed reading frames {start}+ ({e})") from e
        for i, rgb in enumerate(batch):
            # A copy: a kept view would pin the whole batch in memory.
            yield start + i, rgb.copy()


def _decode_tolerant(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """Decode packet by packet so one corrupt packet costs its frame, not the rest of the file."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue  # the caller compares the count with probe's and reports the loss
            yield from frames
    except av.FFmpegError:
        return  # unreadable tail (truncated file): the caller's count check reports it


def _set_threads(stream: av.VideoStream, threads: int | None) -> None:
    """libavcodec threading of a decode: None or 0 FFmpeg's automatic frame and slice threads, 1 none, N N threads."""
    if threads == 1:
        stream.thread_type = "NONE"
        stream.codec_context.thread_count = 1
        return
    stream.thread_type = "AUTO"
    if threads:
        stream.codec_context.thread_count = threads


def _counted_frames(path: Path, info: MediaInfo, threads: int | None = None) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(index, frame)`` for the first ``info.frames`` decoded frames; DecodeError if the count differs."""
    produced = 0
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        _set_threads(stream, threads)
        for frame in _decode_tolerant(container, stream):
            if produced < info.frames:  # past probe's count: keep counting for the error message
                yield produced, frame
            produced += 1
    if produced != info.frames:
        raise DecodeError(f"expected {info.frames} frames (probe's count), PyAV decoded {produced}: {path}")


class _Lost:
    """A failure in the decode loop: ``pts`` of the packet that failed, None when the demuxer gave up."""

    def __init__(self, pts: int | None) -> None:
        self.pts = pts


def _decode_events(container: av.container.InputContainer, stream: av.VideoStream
                   ) -> Iterator[av.VideoFrame | _Lost]:
    """``_decode_tolerant`` that says where it lost something: a ``_Lost`` for each packet that failed
    to decode and for a demuxer that gave up."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                yield _Lost(packet.pts)
                continue
            yield from frames
    except av.FFmpegError:
        yield _Lost(None)


def _index_by_timestamp(path: Path, info: MediaInfo, why: str) -> dict[int, int]:
    with _open_container(path) as container:
        stamps = _frame_timestamps(container, _video_stream(container, path), path)
    if stamps is None or len(stamps) != info.frames:
        got = "no timestamps" if stamps is None else f"{len(stamps)} timestamps"
        raise DecodeError(f"expected {info.frames} frames (probe's count); {why}, and the stream's {got} "
                          f"cannot say which frames the others are: {path}")
    return {ts: i for i, ts in enumerate(stamps)}


def _salvaged_frames(path: Path, info: MediaInfo, damage: list[tuple[int, int]], threads: int | None = None
                     ) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(index, frame)`` for the frames that decode cleanly; the ``[start, end)`` ranges of the rest are
    appended to ``damage`` when the stream ends. Indices rise strictly but may skip.

    While nothing goes wrong frames are counted, as in ``_counted_frames``. From the first failed packet,
    corrupt-flagged frame or skipped timestamp on, frames are named by their timestamps (probe's list),
    and after each failure at frame ``f`` every frame out of the decoder is dropped until a keyframe
    after ``f``: decoders conceal lost data by copying from neighbouring pictures, and frames that come
    out after a failure may reference the lost one, so those pictures are not the video's. Raises
    ``DecodeError`` when no frame decodes cleanly, or when frames went missing or came extra with no
    failure to say where (the indices already handed out could be wrong).
    """
    good = np.zeros(info.frames, dtype=bool)
    index_of: dict[int, int] | None = None   # timestamp -> index, read at the first failure
    counted = 0                              # frames out of the decoder
    last, last_pts = -1, None                # the last frame handed out
    drop_to: int | None = None               # after a failure: drop frames until a keyframe past this index

    def switch_to_timestamps(why: str) -> dict[int, int]:
        table = _index_by_timestamp(path, info, why)
        if last >= 0 and table.get(last_pts) != last:
            raise DecodeError(f"expected frame {last} to carry timestamp {last_pts}, the stream says it is frame "
                              f"{table.get(last_pts)}: frames went missing before the first decode error: {path}")
        return table

    def failed_at(f: int | None) -> int:
        # Unknown position (demuxer gave up, timestamp probe did not list): assume the worst, the end.
        f = info.frames if f is None else f
        return f if drop_to is None else max(drop_to, f)

    with _open_container(path) as container:
        stream = _video_stream(container, path)
        _set_threads(stream, threads)
        for frame in _decode_events(container, stream):
            lost = isinstance(frame, _Lost)
            if lost or frame.is_corrupt:
                if index_of is None:
                    index_of = switch_to_timestamps("decoding failed part-way")
                drop_to = failed_at(index_of.get(frame.pts))
                continue
            index = counted if index_of is None else index_of.get(frame.pts)
            counted += 1
            if index is not None and index > last + 1 and index_of is not None and drop_to is None:
                drop_to = last + 1  # a frame vanished without an error: what follows may reference it
            if drop_to is not None:
                if not (frame.key_frame and index is not None and index > drop_to):
                    continue
                drop_to = None
            if index is None or index <= last or index >= info.frames:
                if index_of is None and index is not None and index >= info.frames:
                    raise DecodeError(f"expected {info.frames} frames (probe's count), PyAV decoded more: {path}")
                continue  # a timestamp probe did not count, or a repeat
            good[index] = True
            last, last_pts = index, frame.pts
            yield index, frame
    if index_of is None and counted != info.frames:
        # No failure, yet fewer frames: fine if they simply stop (a truncated tail), not if some went missing.
        if counted == 0:
            raise DecodeError(f"expected {info.frames} frames (probe's count), PyAV decoded none: {path}")
        switch_to_timestamps(f"PyAV decoded {counted} without an error")
    if not good.any():
        raise DecodeError(f"expected {info.frames} frames (probe's count), none decoded cleanly: {path}")
    bad = np.flatnonzero(~good)
    if len(bad):
        breaks = np.flatnonzero(np.diff(bad) > 1)
        starts = np.concatenate([bad[:1], bad[breaks + 1]])
        ends = np.concatenate([bad[breaks], bad[-1:]]) + 1
        damage.extend((int(a), int(b)) for a, b in zip(starts, ends))


def _iter_pyav(path: Path, info: MediaInfo, max_side: int | None) -> Iterator[tuple[int, np.ndarray]]:
    size = _coded_target(info, max_side)
    for index, frame in _counted_frames(path, info):
        yield index, _frame_rgb(frame, size, info)


def read_span(path: str | Path, info: MediaInfo, start: int, end: int, *,
              max_side: int | None = None) -> np.ndarray:
    """Frames ``[start, end)`` as ``(end - start, H, W, 3)`` uint8, seeking to the keyframe before ``start``.

    Frame indices are those ``open_frames`` yields. Videos are always decoded by PyAV (seeking in
    decord 0.6 is unreliable), so at a downscaled size the pixels may differ slightly from a decord
    stream's; images and animated images by Pillow.
    """
    path = Path(path)
    if not 0 <= start < end <= info.frames:
        raise ValueError(f"expected 0 <= start < end <= {info.frames}, got [{start}, {end}): {path}")
    try:
        return _read_span(path, info, start, end, max_side)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - see _guarded
        raise _unexpected(e, "decoding", path) from e


def _read_span(path: Path, info: MediaInfo, start: int, end: int, max_side: int | None) -> np.ndarray:
    if info.is_image:
        return _read_image(path, info, max_side)[None]
    if _is_animated_image(info):
        return np.stack([f for _, f in _iter_animated(path, info, output_size(info, max_side), start, end)])
    size = _coded_target(info, max_side)
    with _open_container(path) as container:
        stamps = _frame_timestamps(container, _video_stream(container, path), path)
    if stamps is not None and len(stamps) == info.frames:
        # Timestamps name the frames: seek to the keyframe before `start`, decode forward.
        index_of = {ts: i for i, ts in enumerate(stamps)}
        with _open_container(path) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            container.seek(stamps[start], stream=stream, backward=True, any_frame=False)
            indexed = ((index_of.get(frame.pts, -1), frame) for frame in _decode_tolerant(container, stream))
            frames = _take_span(indexed, start, end, size, info, path)
        if frames is not None:
            return frames
    # No usable timestamps, or the seek landed past `start`: decode from the beginning and count.
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        frames = _take_span(enumerate(_decode_tolerant(container, stream)), start, end, size, info, path)
    if frames is None:
        raise DecodeError(f"expected frame {start} in the stream, decoding from the start skipped it: {path}")
    return frames


def _take_span(indexed: Iterator[tuple[int, av.VideoFrame]], start: int, end: int, size: tuple[int, int],
               info: MediaInfo, path: Path) -> np.ndarray | None:
    """Frames [start, end) from (index, frame) pairs; None when the first one after `start` is late."""
    out: list[np.ndarray] = []
    for index, frame in indexed:
        if index < start:
            continue
        if index != start + len(out):
            if not out:
                return None
            raise DecodeError(f"expected frame {start + len(out)} next while reading [{start}, {end}), "
                              f"got frame {index}: {path}")
        out.append(_frame_rgb(frame, size, info))
        if len(out) == end - start:
            return np.stack(out)
    raise DecodeError(f"expected {end - start} frames in [{start}, {end}), decoded {len(out)}: {path}")


def _frame_rgb(frame: av.VideoFrame, size: tuple[int, int], info: MediaInfo) -> np.ndarray:
    """One decoded frame as display-oriented RGB; `size` is the coded-orientation target."""
    if size != (info.width, info.height):
        # BILINEAR: swscale widens the filter when shrinking (no aliasing), and it is what decord's
        # scaler matches most closely.
        rgb = frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="BILINEAR",
                               threads=_SWS_THREADS)
    else:
        rgb = frame.to_ndarray(format="rgb24", threads=_SWS_THREADS)
    return _to_display(rgb, info.rotation)


# ---------------------------------------------------------------------------------------------
# The curation decode: every frame small for scene cut, a thinned subset at the analysis size.

_PLANAR_420 = ("yuv420p", "yuvj420p")


def _plane_view(plane: av.video.plane.VideoPlane) -> np.ndarray:
    """One 8-bit plane as an (height, width) view, without the row padding."""
    rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, :plane.width]


def _shrink_steps(src: tuple[int, int], size: tuple[int, int]) -> list[tuple[tuple[int, int], int]]:
    """The resizes (``(w, h)``, interpolation) that take a ``src`` (w, h) plane to ``size``, in order."""
    w, h = src
    steps: list[tuple[tuple[int, int], int]] = []
    if (w, h) == size:
        return steps
    # Whole-factor area averaging is cheap; fractional area resampling is not (bilinear for the rest).
    k = min(w // size[0], h // size[1])
    # Halvings run OpenCV's SIMD 2x2-average path: two cost 40 % of one 4x area resize (0.04 vs 0.10 ms for a
    # 640x360 plane) and give the same means to within one level of rounding.
    while k >= 2 and k % 2 == 0:
        h, w, k = h // 2, w // 2, k // 2
        steps.append(((w, h), cv2.INTER_AREA))
    if k >= 2:
        w, h = w // k, h // k
        steps.append(((w, h), cv2.INTER_AREA))
    if (w, h) != size:
        steps.append((size, cv2.INTER_LINEAR))
    return steps


def _resized(plane: np.ndarray, steps: list[tuple[tuple[int, int], int]], dst: np.ndarray | None = None) -> np.ndarray:
    """``plane`` through ``steps`` (see _shrink_steps); the last one writes into ``dst`` when given."""
    if not steps:
        if dst is None:
            return plane
        dst[...] = plane
        return dst
    for (wh, interpolation) in steps[:-1]:
        plane = cv2.resize(plane, wh, interpolation=interpolation)
    wh, interpolation = steps[-1]
    out = cv2.resize(plane, wh, dst=dst, interpolation=interpolation)
    if dst is not None and out is not dst:  # OpenCV allocates anew when dst does not fit: the caller reads dst
        raise ValueError(f"expected to resize into the given {dst.shape} {dst.dtype} buffer, OpenCV made a "
                         f"{out.shape} {out.dtype} array instead")
    return out


def _shrink_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return _resized(plane, _shrink_steps((plane.shape[1], plane.shape[0]), size))


def iter_analysis(path: str | Path, info: MediaInfo, *, detect_width: int, max_side: int,
                  keep: Callable[[int], bool], prefetch: bool = True,
                  damage: list[tuple[int, int]] | None = None, threads: int = 0
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """One decode of a video for curation: ``(index, small_bgr, rgb_or_None)`` per frame.

    ``small_bgr`` is every frame at ``detect_width`` wide in coded orientation (the scene detector compares
    colour statistics, which rotation does not change); ``rgb`` is the display-orientation RGB frame at
    ``output_size(info, max_side)`` for the frames where ``keep(index)`` is true, None elsewhere.

    Why not ``open_frames``: converting every frame to full-size RGB (or scaling it inside the decoder)
    costs more than decoding it. Here 4:2:0 frames are read as planes, the detector's copy is built from
    shrunk planes, and only the kept frames are converted at full size. Runs in a background thread
    with ``prefetch``, so conversion overlaps the consumer's scene cut and scoring.

    ``damage``: None (every frame must decode, else ``DecodeError``, as ``open_frames``), or a list
    to salvage a video whose decode fails part-way: the frames that did not decode cleanly (and those
    decoded from damaged data, up to the next keyframe) are skipped, so indices may jump, and their
    ``[start, end)`` ranges are appended to the list when the stream ends. ``DecodeError`` still comes
    when no frame decodes cleanly (or frames vanish with no error to place them).

    ``threads``: libavcodec threads (``[decode] threads``); 0 picks one thread for frames of up to
    ``SINGLE_THREAD_MAX_PIXELS`` coded pixels and FFmpeg's frame threads for larger ones.
    """
    path = Path(path)
    if info.is_image:
        raise ValueError(f"expected a video, got an image: {path}")
    if threads < 0:
        raise ValueError(f"threads: expected >= 0 (0: by frame size), got {threads}")
    if threads == 0:
        threads = 1 if info.width * info.height <= SINGLE_THREAD_MAX_PIXELS else 0
    src = _guarded(_analysis_frames(path, info, detect_width, output_size(info, max_side), keep, damage,
                                    prefetch=prefetch, threads=threads), "the analysis decode", path)
    if not prefetch:
        return src
    return _prefetched(src, _PREFETCH_FRAMES, name=f"analysis decode {path.name}", chunk=_HANDOFF_CHUNK)


def _analysis_frames(path: Path, info: MediaInfo, detect_width: int, size: tuple[int, int],
                     keep: Callable[[int], bool], damage: list[tuple[int, int]] | None, *, prefetch: bool = False,
                     threads: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    w, h = info.width, info.height
    dw = min(detect_width, w) // 4 * 4  # I420 at the small size needs sides divisible by 4 (even chroma rows)
    dsize = (max(4, dw), max(4, round(h * dw / w / 4) * 4))
    if _is_animated_image(info):
        for index, full in _iter_animated(path, info, (w, h)):
            small = cv2.cvtColor(_shrink_plane(full, dsize), cv2.COLOR_RGB2BGR)
            yield index, small, _shrink_plane(full, size) if keep(index) else None
        return
    decoded = (_counted_frames(path, info, threads) if damage is None
               else _salvaged_frames(path, info, damage, threads))
    if prefetch:
        # Decoding and the conversions below cost about the same; in two threads (libavcodec, swscale and cv2
        # release the GIL) they overlap on two cores instead of one thread feeding the scene cut alone
        # (bench/curate_cpu.py's 900 frames, 3 alternating runs: 0.95-1.01 -> 0.82-0.90 s; the kept frames' RGB in
        # the decode thread, or in a third one, was slower).
        # Bytes as open_frames counts them (3 per pixel): a 4:2:0 frame holds half that, 4:4:4 or 10-bit more.
        depth = max(2, min(_PREFETCH_FRAMES, _PREFETCH_BYTES // max(1, w * h * 3)))
        # Frames in chunks (see _prefetched), at most a quarter of the depth so the bytes held stay about the same.
        decoded = _prefetched(decoded, depth, name=f"decode {path.name}", chunk=max(1, min(_HANDOFF_CHUNK, depth // 4)))
    # The small I420 image each frame's planes shrink into: Y rows, then U and V packed as dsize[0]-wide rows. Reused
    # frame after frame: the conversion below reads it into a new array before the next frame overwrites it.
    cw, ch = dsize[0] // 2, dsize[1] // 2
    i420 = np.empty((dsize[1] * 3 // 2, dsize[0]), np.uint8)
    y_dst, u_dst, v_dst = (i420[:dsize[1]], i420[dsize[1]:dsize[1] + ch // 2].reshape(ch, cw),
                           i420[dsize[1] + ch // 2:].reshape(ch, cw))
    steps: dict[tuple, list] = {}  # (plane (w, h), target) -> its resizes, worked out once per video
    for index, frame in decoded:
        kept = keep(index)
        if frame.format.name in _PLANAR_420 and frame.width == w and frame.height == h:
            # Views into the frame's own buffers (rows padded to line_size), not to_ndarray(): that copies and
            # re-stacks the whole I420 frame, a third of this loop's cost, and refuses odd 4:2:0 sizes (chroma
            # at ceil(side / 2)), which these views read as they are.
            y, u, v = (_plane_view(plane) for plane in frame.planes[:3])
            # Shrink the planes, repack as a small I420 image and convert that: the same BT.601
            # video-range conversion swscale applies to the full frame, at 1/16 of the pixels.
            for plane, target, dst in ((y, dsize, y_dst), (u, (cw, ch), u_dst), (v, (cw, ch), v_dst)):
                key = (plane.shape[1], plane.shape[0]), target
                if key not in steps:
                    steps[key] = _shrink_steps(*key)
                _resized(plane, steps[key], dst)
            small = cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)
            rgb = _shrink_plane(_frame_rgb(frame, (w, h), info), size) if kept else None
        else:
            full = frame.to_ndarray(format="rgb24", threads=_SWS_THREADS)  # coded orientation
            small = cv2.cvtColor(_shrink_plane(full, dsize), cv2.COLOR_RGB2BGR)
            rgb = _shrink_plane(_to_display(full, info.rotation), size) if kept else None
        yield index, small, rgb
