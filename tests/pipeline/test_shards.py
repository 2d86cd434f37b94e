"""Shards from generated footage: exact shapes, the right source frames, no stretching, atomic tars."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from catalog import schema
from catalog.shard_index import read_output_index
from catalog.shards import (
    MANIFEST,
    Bucket,
    SampleShapeError,
    corrupt_shards,
    decode_jpg,
    decode_mp4,
    file_sha256,
    missing_pieces,
    sample_key,
    verify_sample,
)
from pipeline.buckets import BucketConfig, crop_box
from pipeline.shards import (
    SCORE_COLUMNS,
    OutputConflictError,
    ShardConfig,
    build_shards,
    crop_resize,
    encode_mp4,
    plan_shards,
    render_clip,
    render_serially,
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/shard_fixtures.py, shared by the shard tests
from shard_fixtures import SMALL_BUCKETS, centre_code, code, disc_box, disc_frame, make_library

FAST = ShardConfig(preset="ultrafast")
MEDIA = Path(__file__).resolve().parents[2] / ".." / "shared" / "media"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("raw")
    videos, clips = make_library(root)
    uris = {v["video_id"]: v["uri"] for v in videos}
    return [dict(c, video_uri=uris[c["video_id"]]) for c in clips]


def read_back(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("*/shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


def tar_names(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_round_trip_every_sample_decodes_to_its_bucket(library, tmp_path):
    out = tmp_path / "shards"
    result = build_shards(library, out, where="true", buckets=SMALL_BUCKETS, shards=FAST)
    assert result.status == "written" and result.errors == []
    samples = read_back(out)
    by_id = {r["clip_id"]: r for r in library}
    assert len(samples) == len(library) - 1  # tiny.mp4 fits no bucket
    assert [s["clip_id"] for s in result.manifest["skipped"]] == [r["clip_id"] for r in library if "tiny" in r["video_uri"]]
    buckets_seen = set()
    for s in samples:
        meta = json.loads(s["json"])
        row = by_id[meta["clip_id"]]
        f, h, w = (int(x) for x in meta["bucket"].split("x"))
        frames = decode_jpg(s["jpg"]) if "jpg" in s else decode_mp4(s["mp4"])
        assert frames.shape == (f, h, w, 3)
        assert ("jpg" in s) == row["is_image"]
        assert s["txt"].decode() == row["caption"]
        assert s["__key__"] == sample_key(row["clip_id"]) and "." not in s["__key__"]
        assert meta["video_id"] == row["video_id"]
        assert meta["span"] == {k: row[k] for k in ("start_frame", "end_frame", "start_s", "end_s")}
        assert meta["scores"] == {k: row[k] for k in SCORE_COLUMNS}
        assert set(SCORE_COLUMNS) <= set(schema.CLIPS.names)
        # Each frame is the source frame nearest its bucket timestamp: the disc's grey level says which.
        if not row["is_image"]:
            step = row["fps"] / meta["fps"]
            assert meta["source_frames"] == [row["start_frame"] + int(np.floor(i * step + 0.5)) for i in range(f)]
            assert meta["source_frames"][-1] < row["end_frame"]
            got = [centre_code(fr) for fr in frames]
            want = [code(i) for i in meta["source_frames"]]
            assert max(abs(a - b) for a, b in zip(got, want)) <= 4, (got, want)
        # Never stretched: the disc stays round (one pixel of rounding either way).
        bw, bh = disc_box(frames[0])
        assert abs(bw - bh) <= 2, (meta["bucket"], bw, bh)
        buckets_seen.add(meta["bucket"])
    assert buckets_seen == {"17x96x160", "9x160x96", "9x64x192", "1x128x128"}
    assert not [n for n in tar_names(out) if n.endswith(".tmp")]


def test_manifest_lists_buckets_shards_and_counts(library, tmp_path):
    out = tmp_path / "shards"
    m = build_shards(library, out, where="aesthetic_mean > 0", buckets=SMALL_BUCKETS,
                     shards=ShardConfig(preset="ultrafast", maxcount=1)).manifest
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("*/shard-*.tar"))
    listed = sorted(s["shard"] for b in m["buckets"].values() for s in b["shards"])
    assert listed == on_disk
    assert m["buckets"]["17x96x160"]["samples"] == 2 and len(m["buckets"]["17x96x160"]["shards"]) == 2  # rollover
    assert m["samples"] == sum(b["samples"] for b in m["buckets"].values()) == len(read_back(out))
    assert m["shards"] == len(on_disk) and m["where"] == "aesthetic_mean > 0"
    shard_rows, sample_rows = read_output_index(out)
    assert len(sample_rows) == m["samples"] and len(shard_rows) == m["shards"]
    assert json.loads((out / MANIFEST).read_text()) == m


def test_rollover_by_size(library, tmp_path):
    out = tmp_path / "shards"
    m = build_shards(library, out, where="true", buckets=SMALL_BUCKETS,
                     shards=ShardConfig(preset="ultrafast", maxsize=1)).manifest
    assert all(s["samples"] == 1 for b in m["buckets"].values() for s in b["shards"])


def test_rerun_is_a_no_op_and_same_selection_gives_same_bytes(library, tmp_path):
    out = tmp_path / "shards"
    build_shards(library, out, where="true", buckets=SMALL_BUCKETS, shards=FAST)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = build_shards(library, out, where="true", buckets=SMALL_BUCKETS, shards=FAST)
    assert again.status == "unchanged"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    # Deterministic output: a second folder gets byte-identical tars.
    other = tmp_path / "other"
    build_shards(list(reversed(library)), other, where="true", buckets=SMALL_BUCKETS, shards=FAST)
    for p in out.glob("*/shard-*.tar"):
        assert (other / p.relative_to(out)).read_bytes() == p.read_bytes()


def test_other_selection_into_same_output_is_refused_unless_overwrite(library, tmp_path):
    out = tmp_path / "shards"
    build_shards(library, out, where="true", buckets=SMALL_BUCKETS, shards=FAST)
    images = [r for r in library if r["is_image"]]
    with pytest.raises(OutputConflictError, match="another selection"):
        build_shards(images, out, where="is_image", buckets=SMALL_BUCKETS, shards=FAST)
    result = build_shards(images, out, where="is_image", buckets=SMALL_BUCKETS, shards=FAST, overwrite=True)
    assert result.status == "written"
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*")) == ["1x128x128/shard-000000.tar"]


def test_output_of_an_older_format_or_unreadable_manifest_is_refused_unless_overwrite(library, tmp_path):
    images = [r for r in library if r["is_image"]]
    out = tmp_path / "shards"
    build_shards(images, out, where="is_image", buckets=SMALL_BUCKETS, shards=FAST)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(dict(manifest, version="1", selection_hash="from-version-1")))
    with pytest.raises(OutputConflictError, match="format version 1 .this writer writes version"):
        build_shards(images, out, where="is_image", buckets=SMALL_BUCKETS, shards=FAST)
    (out / MANIFEST).write_text(json.dumps({"buckets": {"1x128x128": {"shards": ["1x128x128/shard-000000.tar"]}}}))
    with pytest.raises(OutputConflictError, match="manifest this writer cannot read"):
        build_shards(images, out, where="is_image", buckets=SMALL_BUCKETS, shards=FAST)
    assert build_shards(images, out, where="is_image", buckets=SMALL_BUCKETS, shards=FAST,
                        overwrite=True).status == "written"
    assert json.loads((out / MANIFEST).read_text()) == manifest


def test_exception_mid_write_leaves_no_half_tar(library, tmp_path):
    out = tmp_path / "shards"

    def failing(clips, cfg):
        for i, r in enumerate(render_serially(clips, cfg)):
            if i == 2:  # the second 17-frame sample is in an open tar now
                raise RuntimeError("injected failure")
            yield r

    with pytest.raises(RuntimeError, match="injected"):
        build_shards(library, out, where="true", buckets=SMALL_BUCKETS,
                     shards=ShardConfig(preset="ultrafast", maxcount=1), render_many=failing)
    assert not (out / MANIFEST).exists()
    assert not [n for n in tar_names(out) if n.endswith(".tmp")]
    for tar in out.glob("*/shard-*.tar"):  # whatever has a final name is complete
        with tarfile.open(tar) as t:
            names = t.getnames()
            assert len(names) == 3 and all(len(t.extractfile(m).read()) == m.size for m in t.getmembers())
    assert build_shards(library, out, where="true", buckets=SMALL_BUCKETS, shards=FAST).status == "written"
    assert len(read_back(out)) == len(library) - 1


def test_killed_process_leaves_only_a_temporary_which_the_rerun_removes(library, tmp_path):
    out = tmp_path / "shards"
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(library))
    script = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pipeline.shards import ShardConfig, build_shards, render_serially
from shard_fixtures import SMALL_BUCKETS

def dying(clips, cfg):
    for i, r in enumerate(render_serially(clips, cfg)):
        if i == 1:
            os._exit(7)  # no cleanup, no finally: like a killed worker node
        yield r

build_shards(json.loads(open({str(rows)!r}).read()), {str(out)!r}, where="true", buckets=SMALL_BUCKETS,
             shards=ShardConfig(preset="ultrafast"), render_many=dying)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 7, proc.stderr
    left = tar_names(out)
    assert any(n.endswith(".tar.tmp") for n in left), left  # it died with a tar open
    assert not any(n.endswith(".tar") for n in left), left
    build_shards(library, out, where="true", buckets=SMALL_BUCKETS, shards=FAST)
    assert not [n for n in tar_names(out) if n.endswith(".tmp")]
    assert len(read_back(out)) == len(library) - 1


def test_unreadable_source_is_an_error_row_not_a_sample(library, tmp_path):
    broken = [dict(r, video_uri=str(tmp_path / "gone.mp4")) if "land" in r["video_uri"] else r for r in library]
    result = build_shards(broken, tmp_path / "shards", where="true", buckets=SMALL_BUCKETS, shards=FAST)
    assert sorted(c for c, _ in result.errors) == sorted(r["clip_id"] for r in library if "land" in r["video_uri"])
    assert result.manifest["errors"] and "17x96x160" not in result.manifest["buckets"]
    assert len(read_back(tmp_path / "shards")) == len(library) - 3


def test_verify_rejects_a_sample_of_the_wrong_shape():
    frames = np.stack([disc_frame(i, 160, 96) for i in range(16)])
    data = encode_mp4(frames, 8.0, FAST)
    verify_sample("mp4", data, Bucket(16, 96, 160, 8.0))
    with pytest.raises(SampleShapeError, match="16x96x160, expected bucket 17x96x160"):
        verify_sample("mp4", data, Bucket(17, 96, 160, 8.0))
    with pytest.raises(SampleShapeError, match="expected bucket 16x96x176"):
        verify_sample("mp4", data, Bucket(16, 96, 176, 8.0))


def test_mismatch_at_write_time_becomes_an_error_row(library, monkeypatch):
    import pipeline.shards as shards

    monkeypatch.setattr(shards, "encode_mp4", lambda frames, fps, cfg: encode_mp4(frames[:-1], fps, cfg))
    clip = next(c for c in plan_shards(library, SMALL_BUCKETS).clips if not c.bucket.is_image)
    result = render_clip(clip, FAST)
    assert result.files is None and result.error.startswith("SampleShapeError")


@pytest.mark.parametrize(("width", "height"), [(1244, 416), (1721, 1721), (360, 640), (640, 360), (500, 300)])
def test_crop_resize_never_stretches(width, height):
    from pipeline.buckets import assign_bucket

    bucket = assign_bucket(1, 0.0, width, height, True, BucketConfig())
    out = crop_resize(disc_frame(30, width, height)[None], bucket)
    assert out.shape == (1, bucket.height, bucket.width, 3)
    bw, bh = disc_box(out[0])
    assert abs(bw - bh) <= 2, (bucket.name, bw, bh)
    x0, y0, x1, y1 = crop_box(width, height, bucket)
    assert abs((x1 - x0) / (y1 - y0) - bucket.width / bucket.height) <= 1 / min(x1 - x0, y1 - y0) * bucket.width / bucket.height


# ---------------------------------------------------------------------------------------------------------
# Real footage (../shared/media): a 3:1 photo, a square photo and a portrait cut from a real clip.


def _real_rows(media: Path, tmp: Path) -> list[dict]:
    import av
    from PIL import Image

    from shard_fixtures import clip_row, make_video, video_row  # noqa: F401

    # Portrait: a real landscape clip turned on its side and cropped to 9:16.
    with av.open(str(media / "again.mkv")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    portrait = [np.ascontiguousarray(np.rot90(f)[:, 60:420]) for f in frames]  # 640x480 -> 360x640 (w x h)
    path = tmp / "portrait.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 360, 640, "yuv420p"
        s.codec_context.thread_count = 1
        for f in portrait:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())
    rows = []
    v = video_row(path, "real", width=360, height=640, fps=30.0, frames=len(portrait))
    rows.append(dict(clip_row(v, 0, len(portrait), aesthetic=5.5, caption="a hand signs"), video_uri=str(path)))
    for name in ("leopard.jpg", "ice-cream.jpg"):
        with Image.open(media / name) as im:
            w, h = im.size
        v = video_row(media / name, "real", width=w, height=h, fps=None, frames=1, is_image=True)
        rows.append(dict(clip_row(v, 0, 1, aesthetic=6.0, caption=name), video_uri=str(media / name)))
    return rows


@pytest.mark.media
def test_real_wide_square_and_portrait_land_in_sensible_buckets(shared_media, tmp_path):
    rows = _real_rows(shared_media, tmp_path)
    out = tmp_path / "shards"
    result = build_shards(rows, out, where="true", buckets=BucketConfig(), shards=FAST)
    assert result.errors == [] and result.manifest["skipped"] == []
    got = {}
    for s in read_back(out):
        meta = json.loads(s["json"])
        f, h, w = (int(x) for x in meta["bucket"].split("x"))
        frames = decode_jpg(s["jpg"]) if "jpg" in s else decode_mp4(s["mp4"])
        assert frames.shape == (f, h, w, 3)
        x0, y0, x1, y1 = meta["crop"]
        assert abs((x1 - x0) / (y1 - y0) - w / h) <= (w / h) / min(x1 - x0, y1 - y0)  # no stretch
        got[s["txt"].decode()] = meta["bucket"]
    assert got == {"leopard.jpg": "1x336x1024", "ice-cream.jpg": "1x592x592", "a hand signs": "17x336x192"}


def test_manifest_comes_last_with_every_tars_size_and_sha256(library, tmp_path):
    out = tmp_path / "shards"
    seen = []

    def watching(clips, cfg):
        for r in render_serially(clips, cfg):
            seen.append((out / MANIFEST).exists())  # while tars are still being written
            yield r

    m = build_shards(library, out, where="true", buckets=SMALL_BUCKETS,
                     shards=ShardConfig(preset="ultrafast", maxcount=1), render_many=watching).manifest
    assert seen and not any(seen)
    assert missing_pieces(out) == [] and corrupt_shards(out) == []
    for entry in m["buckets"].values():
        for s in entry["shards"]:
            tar = out / s["shard"]
            assert (s["bytes"], s["sha256"]) == (tar.stat().st_size, file_sha256(tar))


def test_killed_after_some_tars_leaves_complete_tars_and_no_manifest(library, tmp_path):
    """The folder a reader must refuse: every tar complete, the manifest never written."""
    out = tmp_path / "shards"
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(library))
    script = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pipeline.shards import ShardConfig, build_shards, render_serially
from shard_fixtures import SMALL_BUCKETS

def dying(clips, cfg):
    for i, r in enumerate(render_serially(clips, cfg)):
        if i == 4:
            os._exit(7)
        yield r

build_shards(json.loads(open({str(rows)!r}).read()), {str(out)!r}, where="true", buckets=SMALL_BUCKETS,
             shards=ShardConfig(preset="ultrafast", maxcount=1), render_many=dying)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 7, proc.stderr
    tars = sorted(out.glob("*/shard-*.tar"))
    assert tars and not (out / MANIFEST).exists()  # tars roll over per bucket: the first is complete
    [problem] = missing_pieces(out)
    assert "manifest.json is missing: the shard job did not finish" in problem
    for tar in tars:
        assert f"{tar.parent.name}: " in problem
    # The rerun completes the folder.
    assert build_shards(library, out, where="true", buckets=SMALL_BUCKETS,
                        shards=ShardConfig(preset="ultrafast", maxcount=1)).status == "written"
    assert missing_pieces(out) == []
