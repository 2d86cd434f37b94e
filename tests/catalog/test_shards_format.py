"""The shard format in catalog.shards: bucket names, manifest, atomic tars, the encoder and decoders."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from catalog.shards import (
    LATENT_KEY,
    MANIFEST,
    SHARDS_VERSION,
    TEXT_KEY,
    Bucket,
    BucketError,
    BucketTarWriter,
    ManifestError,
    bucket_name,
    bucket_shards,
    corrupt_shards,
    decode_array,
    decode_jpg,
    decode_mp4,
    decode_pixels,
    encode_h264,
    encode_jpg,
    file_sha256,
    make_manifest,
    manifest_is_complete,
    manifest_version,
    missing_pieces,
    parse_bucket,
    read_manifest,
    sample_files,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[2]
META = {"clip_id": "v:0-17", "video_id": "v", "span": {"start_frame": 0, "end_frame": 17}, "fps": 8.0,
        "frames": 17, "bucket": "17x32x48", "scores": {"aesthetic_mean": 5.0}}


def smooth_clip(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    """(F, H, W, 3) uint8 of smooth gradients drifting right: the content on which x264's mbtree gave
    different bytes run to run."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = [np.stack([(xx + 2 * t) * 4, yy * 6, (xx + yy + t) * 2], axis=-1) for t in range(frames)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Bucket names


def test_bucket_names_parse_and_round_trip():
    assert parse_bucket("17x256x256") == (17, 256, 256)
    assert parse_bucket("1x336x1024") == (1, 336, 1024)
    assert bucket_name(161, 480, 720) == "161x480x720"
    assert Bucket(49, 256, 448, 8.0).name == "49x256x448" and Bucket(1, 16, 16, 0.0).is_image


@pytest.mark.parametrize(("name", "fragment"), [
    ("17x256", "frames x height x width"),
    ("17x256x256x3", "frames x height x width"),
    ("17-256-256", "frames x height x width"),
    ("ax256x256", "frames x height x width"),
    ("16x256x256", r"4k\+1 frames .*got 16"),
    ("0x256x256", r"4k\+1 frames .*got 0"),
    ("17x250x256", "multiples of 16, got 250x256"),
    ("17x256x0", "multiples of 16, got 256x0"),
])
def test_bad_bucket_names_say_what_was_expected(name, fragment):
    with pytest.raises(BucketError, match=fragment):
        parse_bucket(name)
    with pytest.raises(ValueError):  # BucketError is a ValueError for callers that catch config errors broadly
        parse_bucket(name)


def test_bucket_name_refuses_shapes_that_break_the_rules():
    with pytest.raises(BucketError, match="4k\\+1"):
        bucket_name(18, 256, 256)
    with pytest.raises(BucketError, match="multiples of 16"):
        bucket_name(17, 256, 200)


# ---------------------------------------------------------------------------------------------------------
# Members


def test_encoder_is_byte_identical_in_process_and_across_processes(tmp_path):
    clip = smooth_clip()
    first = encode_h264(clip, 8)
    assert encode_h264(list(clip), 8) == first  # a list of frames or one array: the same bytes
    np.save(tmp_path / "clip.npy", clip)
    script = (f"import numpy as np, sys; from catalog.shards import encode_h264;"
              f" sys.stdout.buffer.write(encode_h264(np.load({str(tmp_path / 'clip.npy')!r}), 8))")
    other = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120, check=True)
    assert other.stdout == first
    assert encode_h264(clip, 8, options={"crf": "30"}) != first  # the options reach the encoder


def test_encoded_video_decodes_to_every_frame_close_to_the_source():
    clip = smooth_clip(17, 32, 48)
    frames = decode_mp4(encode_h264(clip, 8, options={"crf": "12"}))
    assert frames.shape == (17, 32, 48, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - clip).mean() < 4


def test_encoder_refuses_odd_sizes_and_empty_clips():
    with pytest.raises(ValueError, match="even sizes, got 47x32"):
        encode_h264(smooth_clip(3, 32, 47), 8)
    with pytest.raises(ValueError, match="at least one frame"):
        encode_h264([], 8)


def test_image_member_round_trips_and_pixels_pick_the_media_member():
    frame = smooth_clip(1, 32, 48)[0]
    jpg = encode_jpg(frame, quality=95)
    assert jpg == encode_jpg(frame, quality=95)
    assert decode_jpg(jpg).shape == (1, 32, 48, 3)
    assert decode_pixels({"__key__": "k", "jpg": jpg}).shape == (1, 32, 48, 3)
    with pytest.raises(KeyError, match="'mp4' or 'jpg'"):
        decode_pixels({"__key__": "k", "txt": b"a caption"})


def test_sample_files_hold_the_contract_keys_and_arrays_round_trip():
    latent = np.arange(16 * 5 * 4 * 6, dtype=np.float16).reshape(16, 5, 4, 6)  # (C, F', H/8, W/8)
    text = np.linspace(-1, 1, 12 * 8, dtype=np.float32).reshape(12, 8)  # (tokens, dim)
    files = sample_files("mp4", b"video", "a caption", META, arrays={LATENT_KEY: latent, TEXT_KEY: text})
    assert list(files) == ["mp4", "txt", "json", "latent.npy", "text.npy"]
    assert files["txt"].decode() == "a caption" and json.loads(files["json"]) == META
    back = decode_array(files[LATENT_KEY])
    assert back.dtype == np.float16 and np.array_equal(back, latent)
    assert np.array_equal(decode_array(files[TEXT_KEY]), text)
    with pytest.raises(ValueError, match="missing \\['scores'\\]"):
        sample_files("mp4", b"video", "c", {k: v for k, v in META.items() if k != "scores"})
    with pytest.raises(ValueError, match="array members"):
        sample_files("mp4", b"video", "c", META, arrays={"latent.pth": latent})
    with pytest.raises(ValueError, match="numeric array"):
        sample_files("mp4", b"video", "c", META, arrays={LATENT_KEY: np.array([{"a": 1}], dtype=object)})


# ---------------------------------------------------------------------------------------------------------
# Tars and manifest


def _write(root: Path, bucket: str, n: int, maxcount: int) -> list:
    writer = BucketTarWriter(root, bucket, maxcount=maxcount, maxsize=10**9)
    for i in range(n):
        writer.write(f"key{i:03d}", sample_files("jpg", b"x" * (100 + i), f"caption {i}", META))
    return writer.close()


def test_manifest_round_trip_and_completeness(tmp_path):
    infos = _write(tmp_path, "17x32x48", 5, maxcount=2) + _write(tmp_path, "1x32x48", 1, maxcount=2)
    shapes = {"17x32x48": Bucket(17, 32, 48, 8.0), "1x32x48": Bucket(1, 32, 48, 0.0)}
    manifest = make_manifest(infos, shapes, where="true")
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert manifest["samples"] == 6 and manifest["shards"] == 4 and manifest["where"] == "true"
    assert [s["samples"] for s in manifest["buckets"]["17x32x48"]["shards"]] == [2, 2, 1]
    assert manifest["buckets"]["17x32x48"]["fps"] == 8.0
    assert manifest_is_complete(manifest, tmp_path)
    assert bucket_shards(tmp_path, "17x32x48") == [str(tmp_path / "17x32x48" / f"shard-00000{i}.tar") for i in range(3)]
    (tmp_path / "17x32x48" / "shard-000002.tar").write_bytes(b"truncated")
    assert not manifest_is_complete(manifest, tmp_path)
    with pytest.raises(ValueError, match="written by the format"):
        make_manifest(infos, shapes, samples=3)


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda m: m.pop("version"), "'version'"),
    (lambda m: m.update(samples=7), "totals say 7 samples"),
    (lambda m: m["buckets"].update({"16x32x48": m["buckets"].pop("17x32x48")}), "4k\\+1"),
    (lambda m: m["buckets"]["17x32x48"].update(height=64), "do not match its name"),
    (lambda m: m["buckets"]["17x32x48"]["shards"][0].update(shard="elsewhere.tar"), "shard entries"),
    (lambda m: m["buckets"]["17x32x48"].update(samples=1), "not the sum over its shards"),
])
def test_a_manifest_in_another_format_is_refused_naming_the_field(tmp_path, change, fragment):
    manifest = make_manifest(_write(tmp_path, "17x32x48", 3, maxcount=2), {"17x32x48": Bucket(17, 32, 48, 8.0)})
    change(manifest)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=fragment):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError):
        write_manifest(tmp_path, manifest)


def test_tars_have_fixed_metadata_so_rewrites_are_byte_identical(tmp_path):
    _write(tmp_path / "a", "17x32x48", 3, maxcount=10)
    _write(tmp_path / "b", "17x32x48", 3, maxcount=10)
    a, b = (p / "17x32x48" / "shard-000000.tar" for p in (tmp_path / "a", tmp_path / "b"))
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        assert {m.mtime for m in tar} == {0}
        assert tar.getnames()[:3] == ["key000.jpg", "key000.txt", "key000.json"]


def test_writer_refuses_keys_webdataset_would_split(tmp_path):
    writer = BucketTarWriter(tmp_path, "17x32x48", maxcount=2, maxsize=10**9)
    with pytest.raises(ValueError, match="no '.' or '/'"):
        writer.write("v1.mp4:0-17", {"jpg": b"x"})


def test_interrupted_writer_leaves_no_final_named_tar(tmp_path):
    """A process killed with a tar open (no cleanup runs) leaves only the hidden temporary, which readers skip."""
    script = f"""
import json, os
from catalog.shards import BucketTarWriter, sample_files
META = json.loads({json.dumps(META)!r})
w = BucketTarWriter({str(tmp_path)!r}, "17x32x48", maxcount=2, maxsize=10**9)
for i in range(3):  # the third sample opens shard 1
    w.write(f"key{{i}}", sample_files("jpg", b"x" * 5000, "c", META))
os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    names = sorted(p.name for p in (tmp_path / "17x32x48").iterdir())
    assert names == [".shard-000001.tar.tmp", "shard-000000.tar"]  # shard 0 was complete and renamed
    assert bucket_shards(tmp_path, "17x32x48") == [str(tmp_path / "17x32x48" / "shard-000000.tar")]
    with tarfile.open(tmp_path / "17x32x48" / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 6


def test_aborted_writer_removes_its_temporary(tmp_path):
    writer = BucketTarWriter(tmp_path, "17x32x48", maxcount=5, maxsize=10**9)
    writer.write("key0", {"jpg": b"x"})
    writer.abort()
    assert list((tmp_path / "17x32x48").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no shards for bucket 17x32x48"):
        bucket_shards(tmp_path, "17x32x48")


def _complete(root, n=5):
    infos = _write(root, "17x32x48", n, maxcount=2)
    write_manifest(root, make_manifest(infos, {"17x32x48": Bucket(17, 32, 48, 8.0)}))
    return infos


def test_missing_pieces_names_what_a_complete_folder_lacks(tmp_path):
    infos = _write(tmp_path, "17x32x48", 5, maxcount=2)
    [line] = missing_pieces(tmp_path)
    assert "manifest.json is missing" in line and "17x32x48: 3 tar(s)" in line
    write_manifest(tmp_path, make_manifest(infos, {"17x32x48": Bucket(17, 32, 48, 8.0)}))
    assert missing_pieces(tmp_path) == [] and missing_pieces(tmp_path, ["17x32x48"]) == []
    assert missing_pieces(tmp_path, ["1x32x48"]) == [f"bucket 1x32x48: not in {tmp_path / MANIFEST} (it lists ['17x32x48'])"]
    (tmp_path / "17x32x48" / "shard-000001.tar").unlink()
    (tmp_path / "17x32x48" / "shard-000002.tar").write_bytes(b"cut")
    (tmp_path / "17x32x48" / "shard-000007.tar").write_bytes(b"stray")
    (tmp_path / "17x32x48" / ".shard-000008.tar.tmp").write_bytes(b"half")
    size = infos[2].bytes
    assert missing_pieces(tmp_path) == [
        "shard 17x32x48/shard-000001.tar: listed in the manifest (2 samples), missing on disk",
        f"shard 17x32x48/shard-000002.tar: 3 bytes on disk, the manifest says {size} (truncated or rewritten)",
        "bucket 17x32x48: tars the manifest does not list: ['17x32x48/shard-000007.tar']",
        "bucket 17x32x48: unfinished tars ['.shard-000008.tar.tmp'] (a shard job is writing or was killed)",
    ]


def test_corrupt_shards_compares_the_sha256(tmp_path):
    infos = _complete(tmp_path)
    assert all(len(i.sha256) == 64 and i.sha256 == file_sha256(tmp_path / i.shard) for i in infos)
    assert corrupt_shards(tmp_path) == []
    tar = tmp_path / infos[1].shard
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # same size, one byte changed
    tar.write_bytes(bytes(data))
    assert missing_pieces(tmp_path) == []  # sizes match
    assert corrupt_shards(tmp_path) == [f"shard {infos[1].shard}: sha256 differs from the manifest's "
                                        "(the tar changed after it was written)"]


def test_a_manifest_of_an_older_version_is_refused_naming_it(tmp_path):
    manifest = make_manifest(_write(tmp_path, "17x32x48", 1, maxcount=2), {"17x32x48": Bucket(17, 32, 48, 8.0)})
    for s in manifest["buckets"]["17x32x48"]["shards"]:
        del s["sha256"]
    (tmp_path / MANIFEST).write_text(json.dumps(dict(manifest, version="2")))
    with pytest.raises(ManifestError, match=rf"format version 2 \(this reader reads version {SHARDS_VERSION}\)"):
        read_manifest(tmp_path)
    assert manifest_version(tmp_path) == "2"
    assert "format version 2" in missing_pieces(tmp_path)[0]
