"""The built-in sample: small procedural videos and an image whose ground truth is known by construction.

Every item is textured (sums of oriented gratings plus fine noise) so that focus and motion measures
mean something, and only ``logo.mp4`` carries a static overlay. Files are encoded with single-threaded
libx264 (``catalog.shards.encode_h264``), which gives the same bytes run to run, so the sample doubles
as a regression fixture.

``write_bad_inputs`` writes one file per way an input can be broken, for the rejects path.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from catalog.shards import encode_h264, encode_jpg
from pipeline.media import (DecodeError, EmptyFileError, MediaError, NotMediaError, NoVideoStreamError,
                            UnsupportedSizeError)

WIDTH, HEIGHT, FPS = 320, 192, 24
SHOT_FRAMES = 84  # 3.5 s: a shot keeps >= 2 s after trimming 0.25 s at each end
SHORT_FRAMES = 72  # 3 s
LOGO_FRAMES = 96  # 4 s
LOGO_ALPHA = 0.55
DEFOCUS_SIGMA = 3.0
STATIC_NOISE_SIGMA = 1.0
TRUTH_FILE = "sample_truth.json"
# Added to catalog.shards.X264_DEFAULTS (crf 18, veryfast, mbtree off): a keyframe every 2 s.
_X264_OPTIONS = {"g": "48"}


@dataclass(frozen=True)
class SampleItem:
    """Ground truth of one sample file.

    ``cut_frames``: 0-based first frames of every shot after the first (empty for a single shot).
    ``logo_box``: ``(x0, y0, x1, y1)`` of the static overlay as fractions of width/height, or None.
    ``pans``: background motion ``(dx, dy)`` in pixels per frame at the file's size, one per shot
    (the window slides right/down by this much, so the picture moves left/up).
    ``blur_sigma``: Gaussian defocus applied to every frame (0 = sharp).
    """

    file: str
    kind: str
    width: int
    height: int
    fps: float | None
    frames: int
    cut_frames: tuple[int, ...] = ()
    logo_box: tuple[float, float, float, float] | None = None
    pans: tuple[tuple[float, float], ...] = ((0.0, 0.0),)
    blur_sigma: float = 0.0

    @property
    def pan(self) -> tuple[float, float]:
        """The background motion of a single-shot item (``pans`` holds one per shot)."""
        if len(self.pans) != 1:
            raise ValueError(f"{self.file} has {len(self.pans)} shots with different pans; read .pans")
        return self.pans[0]


@dataclass(frozen=True)
class SampleTruth:
    """All items of a generated sample, in generation order."""

    seed: int
    items: tuple[SampleItem, ...]

    def item(self, name: str) -> SampleItem:
        """The item with this file name or kind."""
        for it in self.items:
            if name in (it.file, it.kind):
                return it
        raise KeyError(f"no sample item {name!r}; items are {[it.file for it in self.items]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SampleTruth:
        raw = json.loads(text)
        items = []
        for it in raw["items"]:
            it = dict(it)
            it["cut_frames"] = tuple(it["cut_frames"])
            it["pans"] = tuple(tuple(p) for p in it["pans"])
            it["logo_box"] = tuple(it["logo_box"]) if it["logo_box"] is not None else None
            items.append(SampleItem(**it))
        return cls(seed=raw["seed"], items=tuple(items))


# ---------------------------------------------------------------------------------------------
# procedural content


_PALETTES = {  # base colour and two grating tints: each shot of cuts.mp4 gets a clearly different look
    "warm": ((190, 120, 70), (1.0, 0.6, 0.25), (0.7, 0.3, 0.1)),
    "cool": ((60, 100, 170), (0.25, 0.5, 1.0), (0.1, 0.7, 0.9)),
    "green": ((80, 150, 70), (0.35, 1.0, 0.4), (0.7, 0.9, 0.2)),
    "neutral": ((120, 120, 125), (0.9, 0.85, 0.8), (0.5, 0.6, 0.8)),
}


def _texture(rng: np.random.Generator, h: int, w: int, palette: str) -> np.ndarray:
    """(h, w, 3) uint8: a base colour, oriented gratings (periods 6-120 px) and fine grey grain."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base, *tints = _PALETTES[palette]
    out = np.empty((h, w, 3), np.float32)
    out[:] = np.asarray(base, np.float32)
    for k in range(6):
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 120) if k < 3 else rng.uniform(6, 24)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period) + phase)
        out += wave[..., None] * (np.asarray(tints[k % 2], np.float32) * rng.uniform(18, 32))
    # Fine-grained detail: what a defocus removes first.
    grain = _gaussian_blur(rng.standard_normal((h, w)).astype(np.float32), 0.8)
    out += grain[..., None] * 40.0
    return _to_uint8(out)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reflect borders) over the first two axes.

    numpy rather than cv2: OpenCV's float blur picks SIMD paths by memory alignment, which changes
    the last bit run to run and so the encoded bytes.
    """
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = img.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, weight in enumerate(kernel):
            acc += weight * (padded[k:k + n] if axis == 0 else padded[:, k:k + n])
        out = acc
    return out


def _pan_frames(canvas: np.ndarray, n: int, pan: tuple[float, float], start: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """Windows of WIDTHxHEIGHT sliding over the canvas by ``pan`` pixels per frame."""
    frames = []
    for i in range(n):
        x = int(round(start[0] + pan[0] * i))
        y = int(round(start[1] + pan[1] * i))
        frames.append(canvas[y:y + HEIGHT, x:x + WIDTH].copy())
    return frames


def _canvas_for(rng: np.random.Generator, n: int, pan: tuple[float, float], palette: str) -> np.ndarray:
    h = HEIGHT + int(np.ceil(abs(pan[1]) * n)) + 1
    w = WIDTH + int(np.ceil(abs(pan[0]) * n)) + 1
    return _texture(rng, h, w, palette)


def _add_discs(rng: np.random.Generator, frames: list[np.ndarray], count: int) -> None:
    """Solid rings moving on straight lines: moving edges independent of the background pan."""
    n = len(frames)
    for _ in range(count):
        r = int(rng.integers(14, 28))
        x0, y0 = rng.uniform(r, WIDTH - r), rng.uniform(r, HEIGHT - r)
        # At least 2.5 px/frame: a slow disc would sit still long enough to look like an overlay.
        speed, heading = rng.uniform(2.5, 4.0), rng.uniform(0, 2 * np.pi)
        vx, vy = speed * np.cos(heading), speed * np.sin(heading)
        colour = tuple(int(c) for c in rng.integers(20, 240, 3))
        edge = tuple(255 - c for c in colour)
        for i in range(n):
            # Bounce inside the frame so every disc stays visible.
            x = _bounce(x0 + vx * i, r, WIDTH - r)
            y = _bounce(y0 + vy * i, r, HEIGHT - r)
            cv2.circle(frames[i], (int(x), int(y)), r, colour, -1, lineType=cv2.LINE_AA)
            cv2.circle(frames[i], (int(x), int(y)), r, edge, 3, lineType=cv2.LINE_AA)


def _bounce(v: float, lo: float, hi: float) -> float:
    span = hi - lo
    t = (v - lo) % (2 * span)
    return lo + (t if t <= span else 2 * span - t)


def _logo_mask() -> np.ndarray:
    """(HEIGHT, WIDTH) float32 alpha in [0, 1]: a framed 'LOGO' in the top-right corner."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    x0, y0, x1, y1 = 236, 12, 308, 44
    cv2.rectangle(mask, (x0, y0), (x1, y1), 255, 2, lineType=cv2.LINE_AA)
    cv2.putText(mask, "LOGO", (x0 + 7, y1 - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2, cv2.LINE_AA)
    return mask.astype(np.float32) / 255.0


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask > 0.05)
    h, w = mask.shape
    return (float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w, float(ys.max() + 1) / h)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# items


def _cuts(rng: np.random.Generator) -> tuple[list[np.ndarray], dict]:
    shots, pans = [], ((2.0, 0.0), (0.0, 1.0), (1.5, 1.0))
    for palette, pan, discs in zip(("warm", "cool", "green"), pans, (0, 3, 1)):
        frames = _pan_frames(_canvas_for(rng, SHOT_FRAMES, pan, palette), SHOT_FRAMES, pan)
        _add_discs(rng, frames, discs)
        shots.append(frames)
    cuts = tuple(SHOT_FRAMES * k for k in range(1, len(shots)))
    return [f for shot in shots for f in shot], dict(cut_frames=cuts, pans=pans)


def _logo(rng: np.random.Generator) -> tuple[list[np.ndarray], dict]:
    pan = (3.0, 0.5)
    frames = _pan_frames(_canvas_for(rng, LOGO_FRAMES, pan, "neutral"), LOGO_FRAMES, pan)
    _add_discs(rng, frames, 2)
    alpha = _logo_mask()[..., None] * LOGO_ALPHA
    frames = [_to_uint8(f * (1.0 - alpha) + 255.0 * alpha) for f in frames]
    return frames, dict(logo_box=_box_of(_logo_mask()), pans=(pan,))


def _sharp_pair(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    pan = (2.0, 1.0)
    frames = _pan_frames(_canvas_for(rng, SHORT_FRAMES, pan, "warm"), SHORT_FRAMES, pan)
    _add_discs(rng, frames, 2)
    blurred = [_to_uint8(_gaussian_blur(f, DEFOCUS_SIGMA)) for f in frames]
    return frames, blurred, dict(pans=(pan,))


def _static(rng: np.random.Generator) -> tuple[list[np.ndarray], dict]:
    base = _texture(rng, HEIGHT, WIDTH, "cool")
    cv2.circle(base, (100, 90), 30, (230, 200, 40), -1, lineType=cv2.LINE_AA)
    base = base.astype(np.float32)
    frames = [_to_uint8(base + rng.normal(0, STATIC_NOISE_SIGMA, base.shape).astype(np.float32))
              for _ in range(SHORT_FRAMES)]
    return frames, dict()


def _moving(rng: np.random.Generator) -> tuple[list[np.ndarray], dict]:
    pan = (8.0, 2.0)
    frames = _pan_frames(_canvas_for(rng, SHORT_FRAMES, pan, "green"), SHORT_FRAMES, pan)
    _add_discs(rng, frames, 2)
    return frames, dict(pans=(pan,))


def _still(rng: np.random.Generator) -> np.ndarray:
    h, w = 256, 384
    img = _texture(rng, h, w, "neutral")
    cv2.circle(img, (140, 120), 50, (40, 80, 220), -1, lineType=cv2.LINE_AA)
    cv2.rectangle(img, (230, 60), (330, 200), (230, 120, 30), -1, lineType=cv2.LINE_AA)
    return img


# ---------------------------------------------------------------------------------------------
# encoding and writing


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write atomically unless the file already holds exactly these bytes (keeps mtimes for resumes)."""
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def generate_sample(out_dir: str | Path, *, seed: int = 0) -> SampleTruth:
    """Write the sample videos, the still image and ``sample_truth.json`` into ``out_dir``.

    The same seed gives the same bytes; files already holding those bytes are left untouched.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def rng(k: int) -> np.random.Generator:
        return np.random.default_rng([seed, k])  # one stream per item: items do not shift each other

    items: list[SampleItem] = []
    blobs: list[tuple[str, bytes]] = []

    def add_video(name: str, kind: str, frames: list[np.ndarray], **truth) -> None:
        blobs.append((name, encode_h264(frames, FPS, options=_X264_OPTIONS)))
        items.append(SampleItem(file=name, kind=kind, width=WIDTH, height=HEIGHT, fps=float(FPS),
                                frames=len(frames), **truth))

    frames, truth = _cuts(rng(0))
    add_video("cuts.mp4", "cuts", frames, **truth)
    frames, truth = _logo(rng(1))
    add_video("logo.mp4", "logo", frames, **truth)
    sharp, blurred, truth = _sharp_pair(rng(2))
    add_video("sharp.mp4", "sharp", sharp, **truth)
    add_video("defocused.mp4", "defocused", blurred, blur_sigma=DEFOCUS_SIGMA, **truth)
    frames, truth = _static(rng(3))
    add_video("static.mp4", "static", frames, **truth)
    frames, truth = _moving(rng(4))
    add_video("moving.mp4", "moving", frames, **truth)
    still = _still(rng(5))
    blobs.append(("still.jpg", encode_jpg(still, quality=92)))
    items.append(SampleItem(file="still.jpg", kind="image", width=still.shape[1], height=still.shape[0],
                            fps=None, frames=1))

    for name, data in blobs:
        _write_if_changed(out / name, data)
    sample = SampleTruth(seed=seed, items=tuple(items))
    _write_if_changed(out / TRUTH_FILE, sample.to_json().encode())
    return sample


def load_truth(out_dir: str | Path) -> SampleTruth:
    """The truth written by ``generate_sample`` into ``out_dir``."""
    return SampleTruth.from_json((Path(out_dir) / TRUTH_FILE).read_text())


# ---------------------------------------------------------------------------------------------
# bad inputs


BAD_INPUT_ERRORS: dict[str, type[MediaError]] = {
    "empty": EmptyFileError,
    "truncated": NotMediaError,
    "not_media": NotMediaError,
    "audio_only": NoVideoStreamError,
    "undecodable": DecodeError,
    "too_small": UnsupportedSizeError,
}


def _aac_m4a(seconds: float = 1.0, rate: int = 44100) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="ipod") as container:  # ipod = the .m4a muxer
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        step = 1024
        for i in range(0, len(tone), step):
            frame = av.AudioFrame.from_ndarray(tone[None, i:i + step], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _zero_mdat(mp4: bytes) -> bytes:
    """The same MP4 with its media payload zeroed: the index is intact, no frame decodes."""
    data = bytearray(mp4)
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind = bytes(data[pos + 4:pos + 8])
        if size < 8:
            break
        if kind == b"mdat":
            data[pos + 8:pos + size] = bytes(size - 8)
            return bytes(data)
        pos += size
    raise ValueError("expected an 'mdat' box in the MP4, found none")


def write_bad_inputs(out_dir: str | Path) -> dict[str, Path]:
    """Write one broken input per failure kind; keys are those of ``BAD_INPUT_ERRORS``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    frames = _pan_frames(_canvas_for(rng, 24, (2.0, 0.0), "warm"), 24, (2.0, 0.0))
    good = encode_h264(frames, FPS, options=_X264_OPTIONS)
    tiny = [np.full((8, 8, 3), 40 + 8 * i, np.uint8) for i in range(24)]
    blobs = {
        "empty": ("empty.mp4", b""),
        # The MP4 index (moov) is written last, so the first 40% holds media data and no index.
        "truncated": ("truncated.mp4", good[: len(good) * 2 // 5]),
        "not_media": ("not_media.mp4", b"This is a text file, not a video.\n" * 20),
        "audio_only": ("audio_only.m4a", _aac_m4a()),
        "undecodable": ("undecodable.mp4", _zero_mdat(good)),
        "too_small": ("too_small.mp4", encode_h264(tiny, FPS, options=_X264_OPTIONS)),
    }
    paths = {}
    for key, (name, data) in blobs.items():
        _write_if_changed(out / name, data)
        paths[key] = out / name
    return paths
