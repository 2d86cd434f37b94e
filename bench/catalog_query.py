"""Time a typical catalog query over 1,000,000 clips through the command line's code path.

Builds a synthetic curation output folder (100,000 videos x 10 clips, realistic score distributions, catalog.schema
columns), registers it, then runs a filter + group-by over kept_clips (the view that applies the thresholds table)
with ``catalog.cli.main`` -- parse, refuse-writes check, read-only open, query, format -- and compares it with the same
aggregate over the base table on an already open connection.

    python bench/catalog_query.py [--clips 1000000] [--repeat 5] [--workdir DIR]

Then streams a ``--format json`` result of ``--json-rows`` rows (default 10,000,000) through ``python -m catalog`` in
a child process to /dev/null and prints its peak RSS: ``json_peak_rss_mb=X`` (target < 500; the command holds one
Arrow batch at a time). ``--json-rows 0`` skips it.

Last line: ``query_seconds=X`` (median end-to-end CLI time; target < 0.2 s).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog import cli, db, schema

QUERY = """
SELECT is_image, round(aesthetic_mean) AS aesthetic, count(*) AS clips,
       avg(duration) AS mean_seconds, avg(motion_mean) AS mean_motion
FROM kept_clips
WHERE width >= 640 AND caption_similarity >= 0.25
GROUP BY ALL ORDER BY ALL
"""
BASELINE = """
SELECT is_image, round(aesthetic_mean) AS aesthetic, count(*) AS clips,
       avg(duration) AS mean_seconds, avg(motion_mean) AS mean_motion
FROM clips_history
WHERE width >= 640 AND caption_similarity >= 0.25 AND len(reject_reasons) = 0 AND aesthetic_mean >= 4.5
GROUP BY ALL ORDER BY ALL
"""


def _list_array(values: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(v) for v in values])
    flat = np.concatenate(values) if values else np.array([])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=typ.value_type))


def synthetic_run(n_clips: int, clips_per_video: int, run_id: str, rng: np.random.Generator) -> dict[str, pa.Table]:
    n_videos = n_clips // clips_per_video
    # Content-hash-like ids, as jobs.curate writes them.
    vids = np.array([hashlib.sha256(f"video-{i}".encode()).hexdigest()[:16] for i in range(n_videos)])
    is_image_video = rng.random(n_videos) < 0.05
    fps = rng.choice([24.0, 25.0, 29.97, 30.0, 60.0], n_videos)
    res = rng.choice(np.array([[640, 360], [854, 480], [1280, 720], [1920, 1080], [1080, 1920], [720, 720]]),
                     n_videos)
    video_of = np.repeat(np.arange(n_videos), clips_per_video)
    clip_no = np.tile(np.arange(clips_per_video), n_videos)
    is_image = is_image_video[video_of]
    frames = np.where(is_image, 1, rng.integers(30, 450, n_clips))
    start = clip_no * 500
    clip_fps = fps[video_of]
    duration = np.where(is_image, 0.0, frames / clip_fps)
    n = n_clips
    aesthetic = rng.normal(5.0, 0.8, n).astype(np.float32)
    sharp = rng.beta(5, 3, n)  # focus measure: ~0.25-0.95 in focus, < 0.2 blurred
    motion = np.where(is_image, np.nan, rng.lognormal(2.0, 1.2, n)).astype(np.float32)
    prefiltered = (~is_image) & ((motion < 1.0) | (rng.random(n) < 0.05))
    reasons = [np.array(["too_static"]) if p else np.array([], dtype=str) for p in prefiltered]

    def model_score(x: np.ndarray) -> pa.Array:
        return pa.array(np.where(prefiltered, np.nan, x).astype(np.float32), from_pandas=True)

    vid_col = vids[video_of]
    clip_ids = np.char.add(np.char.add(vid_col, ":"), np.char.add(np.char.add(start.astype(str), "-"),
                                                                    (start + frames).astype(str)))
    caption = "a red car drives along a coastal road at sunset"
    captions = np.where(prefiltered, None, np.array([caption] * n, dtype=object))
    three = pa.array(np.tile(np.arange(3), n))
    models_keys = pa.array(["aesthetic", "watermark", "caption"]).take(three)
    models_vals = pa.array(["laion-aesthetic-l14", "laion-watermark-b3a", "qwen2-vl-2b"]).take(three)
    models = pa.MapArray.from_arrays(pa.array(np.arange(0, 3 * n + 1, 3, dtype=np.int32)), models_keys, models_vals)
    clips = {
        "clip_id": pa.array(clip_ids), "video_id": pa.array(vid_col),
        "start_frame": pa.array(start, pa.int64()), "end_frame": pa.array(start + frames, pa.int64()),
        "start_s": pa.array(start / clip_fps), "end_s": pa.array((start + frames) / clip_fps),
        "frames": pa.array(frames, pa.int64()), "duration": pa.array(duration), "fps": pa.array(clip_fps),
        "width": pa.array(res[video_of, 0], pa.int32()), "height": pa.array(res[video_of, 1], pa.int32()),
        "is_image": pa.array(is_image),
        "sharpness_min": pa.array((sharp * 0.8).astype(np.float32)),
        "sharpness_median": pa.array(sharp.astype(np.float32)),
        "motion_mean": pa.array(motion, from_pandas=True), "motion_max": pa.array(motion * 1.7, from_pandas=True),
        "overlay_score": pa.array(np.where(is_image, np.nan, rng.beta(1, 8, n)).astype(np.float32), from_pandas=True),
        "overlay_box": pa.nulls(n, pa.list_(pa.float32())),
        "watermark_prob": model_score(rng.beta(1, 6, n)), "watermark_max": model_score(rng.beta(1.5, 5, n)),
        "aesthetic_mean": model_score(aesthetic), "aesthetic_min": model_score(aesthetic - 0.5),
        "caption": pa.array(captions, pa.string()),
        "caption_model": pa.array(np.where(prefiltered, None, "qwen2-vl-2b"), pa.string()),
        "caption_tokens": pa.array(np.where(prefiltered, None, rng.integers(60, 200, n)), pa.int32()),
        "caption_latency_s": model_score(rng.gamma(2, 0.5, n)),
        "caption_similarity": model_score(rng.normal(0.29, 0.04, n)),
        "models": models, "stage_versions": models,
        "reject_reasons": _list_array(reasons, pa.list_(pa.string())),
        "preview_jpeg": pa.nulls(n, pa.binary()),  # ~10 kB each in a real run; the queries timed here never read it
        "run_id": pa.array(np.full(n, run_id)),
    }
    videos = {
        "video_id": pa.array(vids), "uri": pa.array(np.char.add("s3://raw/", np.char.add(vids, ".mp4"))),
        "bytes": pa.array(rng.integers(1 << 20, 1 << 28, n_videos), pa.int64()),
        "container": pa.array(np.where(is_image_video, "image/jpeg", "mp4")),
        "codec": pa.array(np.where(is_image_video, "mjpeg", "h264")),
        "width": pa.array(res[:, 0], pa.int32()), "height": pa.array(res[:, 1], pa.int32()),
        "rotation": pa.array(np.zeros(n_videos), pa.int16()),
        "sample_aspect": pa.array(np.ones(n_videos), pa.float32()),
        "display_width": pa.array(res[:, 0], pa.int32()), "display_height": pa.array(res[:, 1], pa.int32()),
        "display_aspect": pa.array(res[:, 0] / res[:, 1], pa.float32()), "fps": pa.array(fps),
        "fps_variable": pa.array(np.zeros(n_videos, bool)), "frames": pa.array(np.full(n_videos, 5000), pa.int64()),
        "duration": pa.array(5000 / fps), "has_audio": pa.array(np.ones(n_videos, bool)),
        "is_image": pa.array(is_image_video), "decoder": pa.array(np.full(n_videos, "pyav")),
        "probe_seconds": pa.array(np.full(n_videos, 0.01)), "cut_frames": pa.nulls(n_videos, pa.list_(pa.int64())),
        "cut_detector": pa.array(np.full(n_videos, "adaptive(3.0)")),
        "num_clips": pa.array(np.full(n_videos, clips_per_video), pa.int32()),
        "run_id": pa.array(np.full(n_videos, run_id)),
    }
    now = datetime.now(UTC)
    runs = [{"run_id": run_id, "started_at": now, "finished_at": now, "wall_seconds": 3600.0, "input": "s3://raw",
             "output": "/bench", "config": "{}", "package_versions": "{}",
             "counts": json.dumps({"videos": n_videos, "clips": n_clips}), "standin_models": False}]
    # Columns added to the schema since (none of them read by the timed queries) are NULL.
    for columns, table_schema, rows in ((clips, schema.CLIPS, n), (videos, schema.VIDEOS, n_videos)):
        for f in table_schema:
            columns.setdefault(f.name, pa.nulls(rows, f.type))
    return {
        "videos": pa.table(videos).select(schema.VIDEOS.names).cast(schema.VIDEOS),
        "clips": pa.table(clips).select(schema.CLIPS.names).cast(schema.CLIPS),
        "rejects": schema.empty("rejects"),
        "runs": schema.to_table("runs", runs),
    }


JSON_QUERY = "SELECT range AS i, 'clip ' || range AS clip_id, range / 7.0 AS score FROM range({rows})"


# The child reports its own VmHWM: a fork's ru_maxrss starts at the parent's RSS (the bench holds the table).
_JSON_CHILD = ("import sys\nfrom catalog.cli import main\ncode = main(sys.argv[1:])\nsys.stdout.flush()\n"
               "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
               "sys.stderr.write(hwm)\nsys.exit(code)\n")


def json_peak_rss(db_path: Path, rows: int) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of the command line's ``--format json`` of ``rows`` rows into /dev/null."""
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        proc = subprocess.run([sys.executable, "-c", _JSON_CHILD, str(db_path), "--format", "json", "--timeout", "0",
                               JSON_QUERY.format(rows=rows)], stdout=sink, stderr=subprocess.PIPE, text=True,
                              check=False, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"json query failed: {proc.stderr.strip()}")
    kib = int(proc.stderr.strip().splitlines()[-1].split()[1])  # "VmHWM:   123456 kB"
    return kib / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=1_000_000)
    ap.add_argument("--clips-per-video", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json-rows", type=int, default=10_000_000, help="rows of the streamed json query; 0 skips it")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the built catalog at this path and reuse it next time (skips the build)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        db_path = args.keep or work / "catalog.duckdb"
        if not db_path.is_file():
            t0 = time.perf_counter()
            tables = synthetic_run(args.clips, args.clips_per_video, "bench000000000001", np.random.default_rng(0))
            run_dir = work / "out"
            run_dir.mkdir()
            for name, table in tables.items():
                pq.write_table(table, run_dir / f"{name}.parquet")
            del tables
            t1 = time.perf_counter()
            db.register_run(db_path, run_dir)
            t2 = time.perf_counter()
            print(f"build_seconds={t1 - t0:.2f} register_seconds={t2 - t1:.2f}")
        con = duckdb.connect(str(db_path), read_only=True)
        n_clips = con.execute("SELECT count(*) FROM clips").fetchone()[0]
        con.close()
        print(f"clips={n_clips} catalog_mb={db_path.stat().st_size / 1e6:.1f}")

        cli_times, cli_cpu = [], []
        for _ in range(args.repeat):
            out, err = io.StringIO(), io.StringIO()
            start, cpu0 = time.perf_counter(), time.process_time()
            code = cli.main([str(db_path), QUERY], out, err)
            cli_times.append(time.perf_counter() - start)
            cli_cpu.append(time.process_time() - cpu0)
            if code != 0:
                sys.exit(f"query failed: {err.getvalue()}")
        print(out.getvalue().rstrip())

        con = duckdb.connect(str(db_path), read_only=True)
        base_times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            con.execute(BASELINE).fetchall()
            base_times.append(time.perf_counter() - start)
        con.close()
        cli_s, base_s = statistics.median(cli_times), statistics.median(base_times)
        # Wall time on a shared 2-core box swings with other work; CPU seconds (all DuckDB threads) and the load
        # average say how much of the figure is the query.
        print(f"cli_first_seconds={cli_times[0]:.3f} cli_min_seconds={min(cli_times):.3f} "
              f"cli_cpu_seconds={statistics.median(cli_cpu):.3f} base_table_query_seconds={base_s:.3f} "
              f"cli_vs_base_ratio={cli_s / base_s:.2f} load_average={os.getloadavg()[0]:.1f} cpus={os.cpu_count()}")
        if args.json_rows > 0:
            peak_mb, json_s = json_peak_rss(db_path, args.json_rows)
            print(f"json_rows={args.json_rows} json_seconds={json_s:.1f} json_peak_rss_mb={peak_mb:.0f} (target < 500)")
        print(f"query_seconds={cli_s:.3f}")


if __name__ == "__main__":
    main()
