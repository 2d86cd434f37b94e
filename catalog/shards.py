"""The shard format: the one contract between the curation pipeline (which writes shards) and the trainer
(which reads them). Both import it from here; neither knows the other.

Layout::

    ROOT/manifest.json                      buckets, shards, counts (``make_manifest`` / ``read_manifest``)
    ROOT/<F>x<H>x<W>/shard-000000.tar       one folder per bucket, tars numbered from 0
    ROOT/<F>x<H>x<W>/.shard-000000.tar.tmp  a tar being written; renamed to its final name once complete

Buckets (DESIGN.md §4): ``F`` frames is 4k+1 (1 for images, 17, 49, 81, 161, ...) because the VAE
compresses time 4x keeping the first frame apart; ``H`` and ``W`` are multiples of 16 (8x VAE
downsampling, then 2x2 patches). Every sample in a bucket decodes to exactly F x H x W.

A sample is the tar members ``<key>.<ext>`` sharing one ``__key__`` (``sample_key``: no '.' or '/'):

- ``mp4`` (H.264 yuv420p, F frames) or ``jpg`` (F = 1): the pixels, from ``encode_h264`` / ``encode_jpg``;
- ``txt``: the caption, UTF-8;
- ``json``: clip id, source video id, span, fps, frames, bucket, scores (``META_FIELDS``), sorted keys. ``fps`` is
  the sample's own frame rate: a writer may put one clip into a bucket at several frame strides (CogVideo's
  multi-frame-rate training), and a sample taken at ``stride`` s from frames resampled to the bucket's rate has
  ``fps`` = that rate / s (the pipeline's writer also records ``stride``); images have fps 0;
- ``latent.npy`` / ``text.npy`` / ``text_mask.npy`` (optional, precomputed for the DiT): arrays as
  ``.npy`` bytes (``encode_array``: no pickles, so reading a shard never runs code).

Tar members carry fixed metadata (mtime 0, mode 644), and the encoder is single-threaded x264 with
mbtree off, so the same input gives byte-identical tars run after run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
# Bump when the bytes written for the same clip and config change (encoder settings, json layout, manifest).
# 2: one encoder for every writer (x264 mbtree off), manifest checked on read.
# 3: every shard entry carries its sha256; the manifest is written (and fsynced) after the last tar.
# 4: a clip may be written at several frame strides (sample json gains ``stride``; ``fps`` is the sample's own).
SHARDS_VERSION = "4"

# Sample members (WebDataset keys: the member name after the sample key's '.').
VIDEO_KEY = "mp4"
IMAGE_KEY = "jpg"
CAPTION_KEY = "txt"
META_KEY = "json"
LATENT_KEY = "latent.npy"
"""Precomputed VAE posterior of the pixels: moments (2C, F', H/8, W/8), mean channels then log-variance
channels, with F' = (F - 1) / 4 + 1 (trainer.data.encode_precomputed writes it)."""
TEXT_KEY = "text.npy"
"""Precomputed text-encoder states of the caption, (tokens, dim) float32."""
TEXT_MASK_KEY = "text_mask.npy"
"""Padding mask (tokens,) uint8 of ``text.npy``; a sample without it counts every token as valid."""
MEDIA_KEYS = (VIDEO_KEY, IMAGE_KEY)
ARRAY_KEYS = (LATENT_KEY, TEXT_KEY, TEXT_MASK_KEY)
META_FIELDS = ("clip_id", "video_id", "span", "fps", "frames", "bucket", "scores")
"""Fields every sample's ``json`` holds; writers may add more."""

_BUCKET_DIR = re.compile(r"^\d+x\d+x\d+$")
_SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")
_TMP_NAME = re.compile(r"^\.shard-\d{6}\.tar\.tmp$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# mbtree off: its SIMD code reads uninitialised memory here, so even single-threaded x264 gave
# different bytes run to run on smooth (defocused) content whenever the heap held other garbage.
X264_DEFAULTS = {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"}


class BucketError(ValueError):
    """A bucket name or size breaks the 4k+1 frames / multiple-of-16 rules."""


class SampleShapeError(RuntimeError):
    """A sample does not decode to its bucket's frames x height x width, or a tar disagrees with its manifest."""


class ManifestError(ValueError):
    """A manifest.json is not in the format ``make_manifest`` writes."""


class IncompleteShardsError(FileNotFoundError):
    """A shard folder without a complete manifest (a killed or unfinished shard job): the message names what is
    missing."""


# ---------------------------------------------------------------------------------------------------------
# Buckets


def is_frame_count(n: object) -> bool:
    """1, 5, 9, ..., 17, 49, 161: the frame counts a bucket may have (4k+1)."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n - 1) % 4 == 0


def is_side(n: object) -> bool:
    """A bucket height or width: a positive multiple of 16."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 16 and n % 16 == 0


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (height, width); both must be positive multiples of 16."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise BucketError(f"expected 'HxW' like '256x256', got {text!r}")
    h, w = (int(p) for p in parts)
    if not (is_side(h) and is_side(w)):
        raise BucketError(f"expected height and width multiples of 16, got {text!r}")
    return h, w


def parse_bucket(name: str) -> tuple[int, int, int]:
    """"17x256x256" -> (17, 256, 256); raises ``BucketError`` naming the broken rule."""
    parts = str(name).split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise BucketError(f"expected a bucket name like '17x256x256' (frames x height x width), got {name!r}")
    f, h, w = (int(p) for p in parts)
    if not is_frame_count(f):
        raise BucketError(f"bucket {name!r}: expected 4k+1 frames (1, 17, 49, 81, 161, ...), got {f}")
    if not (is_side(h) and is_side(w)):
        raise BucketError(f"bucket {name!r}: expected height and width multiples of 16, got {h}x{w}")
    return f, h, w


def bucket_name(frames: int, height: int, width: int) -> str:
    """(17, 256, 256) -> "17x256x256", checked against the rules."""
    name = f"{frames}x{height}x{width}"
    parse_bucket(name)
    return name


@dataclass(frozen=True, slots=True)
class Bucket:
    """One training shape. ``fps`` is 0.0 for the image bucket (a still has no frame rate). In a manifest it is
    the rate the bucket's clips are resampled to; a sample written at frame stride s has fps / s (its json says).

    Not checked on construction: a writer's verifier builds buckets from whatever a decoder returned.
    """

    frames: int
    height: int
    width: int
    fps: float

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def is_image(self) -> bool:
        return self.frames == 1


def sample_key(clip_id: str, stride: int = 1) -> str:
    """WebDataset ``__key__`` for a clip (at a frame stride): readable, deterministic, unique, free of '.' and '/'.

    WebDataset splits a member name at the first '.' of its basename, so the id's other
    characters become '_' and a short hash of the exact id keeps two ids that differ only
    in those characters apart. Stride 1 is the clip's plain key; another stride names itself
    (``..._stride2_<hash>``), so the same clip at two frame rates is two distinct samples.
    """
    if not (isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1):
        raise ValueError(f"sample_key: expected a frame stride >= 1, got {stride!r}")
    ident = clip_id if stride == 1 else f"{clip_id}@stride{stride}"
    readable = re.sub(r"[^A-Za-z0-9-]", "_", ident)
    return f"{readable}_{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------------------
# Layout


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def tmp_shard_name(index: int) -> str:
    return f".shard-{index:06d}.tar.tmp"


def is_bucket_dir(name: str) -> bool:
    return bool(_BUCKET_DIR.match(name))


def is_shard_name(name: str) -> bool:
    return bool(_SHARD_NAME.match(name))


def is_tmp_shard_name(name: str) -> bool:
    return bool(_TMP_NAME.match(name))


def bucket_shards(root: str | Path, bucket: str) -> list[str]:
    """Sorted complete tar paths of one bucket (temporaries are hidden names); raises when there are none."""
    parse_bucket(bucket)
    folder = Path(root) / bucket
    urls = sorted(str(p) for p in folder.glob("shard-*.tar") if is_shard_name(p.name))
    if not urls:
        raise FileNotFoundError(f"no shards for bucket {bucket}: expected {folder}/shard-NNNNNN.tar")
    return urls


# ---------------------------------------------------------------------------------------------------------
# Members: the one encoder and decoder of each kind.


def encode_h264(frames: Sequence[np.ndarray] | np.ndarray, fps: float, *, options: Mapping[str, str] | None = None) -> bytes:
    """(F, H, W, 3) RGB uint8 -> H.264 yuv420p mp4 bytes; byte-identical run to run.

    Single-threaded libx264 with mbtree off (``X264_DEFAULTS``); ``options`` (x264/libavcodec options
    such as ``crf``, ``preset``, ``g``) are added to the defaults.
    """
    if len(frames) == 0:
        raise ValueError("encode_h264: expected at least one frame, got none")
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"encode_h264: yuv420p needs even sizes, got {w}x{h}")
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with _av_open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={**X264_DEFAULTS, **(options or {})})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for rgb in frames:
            container.mux(stream.encode(_video_frame(rgb)))
        container.mux(stream.encode())
    return buf.getvalue()


def encode_jpg(frame: np.ndarray, quality: int = 95) -> bytes:
    """(H, W, 3) RGB uint8 -> JPEG bytes (Pillow, deterministic)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """mp4 bytes -> (F, H, W, 3) RGB uint8, every frame."""
    with _av_open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("video sample decoded to zero frames")
    return np.stack(frames)


def decode_jpg(data: bytes) -> np.ndarray:
    """JPEG (or PNG) bytes -> (1, H, W, 3) RGB uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))[None]


def decode_pixels(sample: Mapping[str, Any]) -> np.ndarray:
    """The ``mp4`` or ``jpg`` member of a raw WebDataset sample -> (F, H, W, 3) RGB uint8."""
    if VIDEO_KEY in sample:
        return decode_mp4(sample[VIDEO_KEY])
    if IMAGE_KEY in sample:
        return decode_jpg(sample[IMAGE_KEY])
    keys = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"sample {sample.get('__key__')}: expected an 'mp4' or 'jpg' member, got {keys}")


def decoded_shape(ext: str, data: bytes) -> tuple[int, int, int]:
    """(frames, height, width) a decoder gets from a sample; every frame is decoded, none converted to RGB."""
    if ext == IMAGE_KEY:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return 1, img.height, img.width
    sizes = set()
    n = 0
    with _av_open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            sizes.add((frame.height, frame.width))
            n += 1
    if len(sizes) != 1:
        return n, -1, -1  # no frames, or frames of different sizes: matches no bucket
    return (n, *sizes.pop())


def verify_sample(ext: str, data: bytes, bucket: Bucket) -> None:
    """Decode what was written; raise ``SampleShapeError`` unless it is exactly the bucket's F x H x W."""
    got = decoded_shape(ext, data)
    want = (bucket.frames, bucket.height, bucket.width)
    if got != want:
        raise SampleShapeError(f"{ext} sample decodes to {got[0]}x{got[1]}x{got[2]}, expected bucket {bucket.name}")


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    """The ``json`` member: sorted keys, so the same metadata gives the same bytes."""
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"sample json: expected fields {list(META_FIELDS)}, missing {missing}")
    return json.dumps(meta, sort_keys=True, default=str).encode()


def decode_meta(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def encode_array(array: np.ndarray) -> bytes:
    """A ``latent.npy`` / ``text.npy`` member: ``.npy`` bytes of a numeric array, never a pickle."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"encode_array: expected a numeric array, got dtype {array.dtype}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_files(media_ext: str, media: bytes, caption: str, meta: Mapping[str, Any],
                 arrays: Mapping[str, np.ndarray] | None = None) -> dict[str, bytes]:
    """The members of one sample, in the order they go into the tar."""
    if media_ext not in MEDIA_KEYS:
        raise ValueError(f"expected media member {MEDIA_KEYS}, got {media_ext!r}")
    files = {media_ext: media, CAPTION_KEY: caption.encode(), META_KEY: encode_meta(meta)}
    for key, array in (arrays or {}).items():
        if key not in ARRAY_KEYS:
            raise ValueError(f"expected array members {ARRAY_KEYS}, got {key!r}")
        files[key] = encode_array(array)
    return files


def _av_open(*args: Any, **kwargs: Any):
    import av  # PyAV loads only where samples are encoded or decoded

    return av.open(*args, **kwargs)


def _video_frame(rgb: np.ndarray):
    import av

    return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")


# ---------------------------------------------------------------------------------------------------------
# Tars


@dataclass
class ShardInfo:
    shard: str  # relative to the output folder: "<bucket>/shard-NNNNNN.tar"
    bucket: str
    samples: int
    bytes: int
    sha256: str  # of the whole tar, hex


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same input, same bytes
    return info, io.BytesIO(data)


class BucketTarWriter:
    """Sequential tars of one bucket; each appears under its final name only once complete.

    A tar is written as ``.shard-NNNNNN.tar.tmp``, rolled over at ``maxcount`` samples or ``maxsize``
    bytes (a tar holds at least one sample), fsynced and renamed. A crash never leaves a half tar under
    a final name; ``abort`` drops the open one.
    """

    def __init__(self, out_dir: str | Path, bucket: str, *, maxcount: int, maxsize: int) -> None:
        parse_bucket(bucket)
        self.dir = Path(out_dir) / bucket
        self.bucket, self.maxcount, self.maxsize = bucket, maxcount, maxsize
        self.done: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def write(self, key: str, files: Mapping[str, bytes]) -> str:
        """Add one sample; returns the shard (relative path) it went to."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r}: expected no '.' or '/' (see sample_key)")
        size = sum(512 + -(-len(d) // 512) * 512 for d in files.values())
        if self._tar is not None and (self._count >= self.maxcount or self._bytes + size > self.maxsize):
            self._finish()
        if self._tar is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(self._tmp_path(len(self.done)), "w", format=tarfile.PAX_FORMAT)
            self._count = self._bytes = 0
        for ext, data in files.items():
            self._tar.addfile(*tar_member(f"{key}.{ext}", data))
        self._count += 1
        self._bytes += size
        return f"{self.bucket}/{self._final_path(len(self.done)).name}"

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.done

    def abort(self) -> None:
        """Drop the tar being written (used when the run fails part-way)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp_path(len(self.done)).unlink(missing_ok=True)
            self._tar = None

    def _tmp_path(self, index: int) -> Path:
        return self.dir / tmp_shard_name(index)

    def _final_path(self, index: int) -> Path:
        return self.dir / shard_name(index)

    def _finish(self) -> None:
        index = len(self.done)
        assert self._tar is not None, "no open tar to finish"
        self._tar.close()
        tmp, final = self._tmp_path(index), self._final_path(index)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())  # the bytes reach the disk before the name says the tar is complete
        sha = file_sha256(tmp)  # read back from the page cache: the hash of what the disk holds
        os.replace(tmp, final)
        self.done.append(ShardInfo(f"{self.bucket}/{final.name}", self.bucket, self._count, final.stat().st_size, sha))
        self._tar = None


# ---------------------------------------------------------------------------------------------------------
# Manifest
#
#   {"version": SHARDS_VERSION, "samples": N, "shards": N,
#    "buckets": {"17x256x256": {"frames": 17, "height": 256, "width": 256, "fps": 8.0, "samples": N,
#                               "shards": [{"shard": "17x256x256/shard-000000.tar", "samples": N, "bytes": N,
#                                           "sha256": "<hex>"}]}},
#    ... writer-specific fields (the pipeline adds selection_hash, where, configs, skipped, errors)}


def make_manifest(infos: Iterable[ShardInfo], buckets: Mapping[str, Bucket], **fields: Any) -> dict[str, Any]:
    """The manifest of written shards, as the plain JSON a later ``read_manifest`` returns."""
    infos = list(infos)
    entries: dict[str, Any] = {}
    for info in infos:
        b = buckets[info.bucket]
        entry = entries.setdefault(info.bucket, {
            "frames": b.frames, "height": b.height, "width": b.width, "fps": b.fps, "samples": 0, "shards": [],
        })
        entry["samples"] += info.samples
        entry["shards"].append({"shard": info.shard, "samples": info.samples, "bytes": info.bytes,
                                "sha256": info.sha256})
    clash = sorted(set(fields) & {"version", "samples", "shards", "buckets"})
    if clash:
        raise ValueError(f"make_manifest: {clash} are written by the format itself")
    manifest = {
        "version": SHARDS_VERSION,
        "samples": sum(i.samples for i in infos),
        "shards": len(infos),
        "buckets": entries,
        **fields,
    }
    manifest = json.loads(json.dumps(manifest, default=str))
    check_manifest(manifest)
    return manifest


def check_manifest(manifest: Any, where: str = MANIFEST) -> None:
    """Raise ``ManifestError`` naming the first field that is not as ``make_manifest`` writes it."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    for key, kind in (("version", str), ("samples", int), ("shards", int), ("buckets", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ManifestError(f"{where}: expected {key!r} ({kind.__name__}), got {manifest.get(key)!r}")
    if manifest["version"] != SHARDS_VERSION:
        raise ManifestError(f"{where}: shards in format version {manifest['version']} (this reader reads version "
                            f"{SHARDS_VERSION}); rebuild them with python -m jobs.shards --overwrite")
    samples = shards = 0
    for name, b in manifest["buckets"].items():
        try:
            shape = parse_bucket(name)
        except BucketError as err:
            raise ManifestError(f"{where}: {err}") from err
        if not isinstance(b, dict) or not isinstance(b.get("shards"), list):
            raise ManifestError(f"{where}: bucket {name}: expected an object with a 'shards' list, got {b!r}")
        if (b.get("frames"), b.get("height"), b.get("width")) != shape:
            raise ManifestError(f"{where}: bucket {name}: frames/height/width {b.get('frames')}, {b.get('height')},"
                                f" {b.get('width')} do not match its name")
        for s in b["shards"]:
            if not (isinstance(s, dict) and isinstance(s.get("shard"), str) and s["shard"].startswith(f"{name}/")
                    and isinstance(s.get("samples"), int) and isinstance(s.get("bytes"), int)
                    and isinstance(s.get("sha256"), str) and _SHA256.match(s["sha256"])):
                raise ManifestError(f"{where}: bucket {name}: expected shard entries {{'shard': "
                                    f"'{name}/shard-NNNNNN.tar', 'samples': int, 'bytes': int, 'sha256': hex}}, got {s!r}")
        if sum(s["samples"] for s in b["shards"]) != b.get("samples"):
            raise ManifestError(f"{where}: bucket {name}: 'samples' {b.get('samples')} is not the sum over its shards")
        samples += b["samples"]
        shards += len(b["shards"])
    if (samples, shards) != (manifest["samples"], manifest["shards"]):
        raise ManifestError(f"{where}: totals say {manifest['samples']} samples in {manifest['shards']} shards,"
                            f" the buckets hold {samples} in {shards}")


def write_manifest(out_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temporary name, fsync, rename). Writers call it after the last tar is
    renamed: a folder with a manifest is complete, one without is a job that did not finish."""
    check_manifest(manifest)
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a shard folder, or None when it has none; a malformed one raises ``ManifestError``."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON: {err}") from err
    check_manifest(manifest, str(path))
    return manifest


def manifest_is_complete(manifest: Mapping[str, Any], out_dir: str | Path) -> bool:
    """Every shard the manifest lists is on disk with the size it recorded."""
    for b in manifest["buckets"].values():
        for s in b["shards"]:
            path = Path(out_dir) / s["shard"]
            if not path.is_file() or path.stat().st_size != s["bytes"]:
                return False
    return True


def manifest_version(out_dir: str | Path) -> str | None:
    """The ``version`` a folder's manifest.json claims, read without checking the rest (None: no readable one)."""
    try:
        raw = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    version = raw.get("version") if isinstance(raw, dict) else None
    return version if isinstance(version, str) else None


def missing_pieces(out_dir: str | Path, buckets: Iterable[str] | None = None) -> list[str]:
    """What keeps ``out_dir`` from being a complete shard folder for ``buckets`` (every bucket of its manifest when
    None), one line each: no manifest (or an unreadable one), a bucket the manifest lacks, a listed tar missing or
    of another size, a tar on disk the manifest does not list, a temporary of an unfinished write. Empty: complete.

    Sizes only (a stat per tar); ``corrupt_shards`` compares the hashes.
    """
    root = Path(out_dir)
    wanted = None if buckets is None else list(buckets)
    try:
        manifest = read_manifest(root)
    except ManifestError as err:
        return [str(err)]
    if manifest is None:
        on_disk = _tars_on_disk(root, wanted)
        held = ", ".join(f"{b}: {len(t)} tar(s)" for b, t in sorted(on_disk.items())) or "no tars"
        return [f"{root / MANIFEST} is missing: the shard job did not finish (it writes the manifest after the last"
                f" tar); the folder holds {held}"]
    problems = []
    for bucket in sorted(manifest["buckets"]) if wanted is None else wanted:
        entry = manifest["buckets"].get(bucket)
        if entry is None:
            problems.append(f"bucket {bucket}: not in {root / MANIFEST} (it lists {sorted(manifest['buckets'])})")
            continue
        listed = set()
        for s in entry["shards"]:
            listed.add(s["shard"])
            path = root / s["shard"]
            if not path.is_file():
                problems.append(f"shard {s['shard']}: listed in the manifest ({s['samples']} samples), missing on disk")
            elif path.stat().st_size != s["bytes"]:
                problems.append(f"shard {s['shard']}: {path.stat().st_size} bytes on disk, the manifest says "
                                f"{s['bytes']} (truncated or rewritten)")
        extra = sorted(set(_tars_on_disk(root, [bucket]).get(bucket, [])) - listed)
        if extra:
            problems.append(f"bucket {bucket}: tars the manifest does not list: {extra}")
        if (root / bucket).is_dir():
            tmp = sorted(p.name for p in (root / bucket).iterdir() if is_tmp_shard_name(p.name))
            if tmp:
                problems.append(f"bucket {bucket}: unfinished tars {tmp} (a shard job is writing or was killed)")
    return problems


def complete_shards(out_dir: str | Path, bucket: str) -> list[str]:
    """The tar paths a complete manifest lists for ``bucket``, in order (``missing_pieces`` says whether it is)."""
    manifest = read_manifest(out_dir)
    if manifest is None or bucket not in manifest["buckets"]:
        raise IncompleteShardsError(f"bucket {bucket}: not in {Path(out_dir) / MANIFEST}")
    return [str(Path(out_dir) / s["shard"]) for s in manifest["buckets"][bucket]["shards"]]


def corrupt_shards(out_dir: str | Path, buckets: Iterable[str] | None = None) -> list[str]:
    """Listed tars whose sha256 differs from the manifest's, one line each (reads every byte of every tar)."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return [f"{Path(out_dir) / MANIFEST} is missing"]
    bad = []
    for bucket in sorted(manifest["buckets"]) if buckets is None else buckets:
        for s in manifest["buckets"].get(bucket, {}).get("shards", []):
            path = Path(out_dir) / s["shard"]
            if path.is_file() and file_sha256(path) != s["sha256"]:
                bad.append(f"shard {s['shard']}: sha256 differs from the manifest's (the tar changed after it was written)")
    return bad


def _tars_on_disk(root: Path, buckets: list[str] | None) -> dict[str, list[str]]:
    """{bucket: ["<bucket>/shard-NNNNNN.tar", ...]} of the complete-named tars under ``root``."""
    out: dict[str, list[str]] = {}
    if not root.is_dir():
        return out
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and is_bucket_dir(sub.name) and (buckets is None or sub.name in buckets):
            tars = sorted(f"{sub.name}/{p.name}" for p in sub.iterdir() if is_shard_name(p.name))
            if tars:
                out[sub.name] = tars
    return out
