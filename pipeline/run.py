"""The curation run builder: lists inputs, lays the stages out as a Ray Data pipeline, writes the tables.

Output folder layout:
  OUT/videos.parquet, clips.parquet, rejects.parquet, skipped.parquet, runs.parquet   the tables (catalog.schema)
  OUT/_parts/{videos,clips,rejects}/<uri_key>.parquet                per-input results, written as each input completes
  OUT/_parts/done/<uri_key>.json                                     resume markers
A killed run, started again with the same config, skips every input that has a done marker and only
processes the rest; the tables are then rebuilt from all parts, so nothing is duplicated.

Every directory entry under the input that is not a directory ends as a row: in ``videos``, ``rejects`` or
``skipped`` (with a reason). Each attempt writes its ``runs`` row before any work and completes it at the end,
so a row never names a run that has no ``runs`` row, whatever was killed when and whatever the input list did
in between. File names need not be UTF-8: keys and ids hash the name's bytes and tables show it escaped.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import json
import os
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from catalog import schema
from pipeline.analyze import apply_video_overlay, shown, uri_key
from pipeline.settings import CurateConfig
from pipeline.stages import ModelSources, analyze_row, get_stage

TABLE_FILES = ("videos", "clips", "rejects")

# stat file types that are not regular files, named for skipped.detail
_FILE_TYPES = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"))

# progress(inputs done, inputs to do, uri, what became of it)
Progress = Callable[[int, int, str, str], None]


def log(msg: str) -> None:
    print(f"[curate] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Skip:
    """A directory entry under the input that is not curated: a ``skipped`` row without its run id."""

    uri: str      # the real path (may hold surrogate-escaped bytes); the table shows it escaped
    reason: str   # one of catalog.schema.SKIP_REASONS
    detail: str

    def row(self) -> dict[str, Any]:
        return {"uri": shown(self.uri), "reason": self.reason, "detail": shown(self.detail)}


def _path_order(p: str) -> tuple[str, ...]:
    return Path(p).parts


def scan_inputs(root: str | Path, extensions: tuple[str, ...]) -> tuple[list[str], list[Skip]]:
    """Media files under ``root`` (sorted, absolute) and every other non-directory entry, with why it is skipped.

    Directories are walked, not followed through symlinks (a symlink to a folder is ``not_a_file``), so a link
    loop cannot recurse. Precedence: ``hidden`` (a dot-name, or inside a dot-folder), then what ``stat`` says
    through the link: ``broken_symlink``, ``symlink_loop``, ``vanished`` (gone since the folder was read),
    ``unreadable``, ``not_a_file`` (FIFO, socket, device, linked folder), ``extension``.
    """
    root = Path(root).expanduser().resolve()
    if root.is_file():
        return [str(root)], []
    if not root.is_dir():
        raise FileNotFoundError(f"input {shown(str(root))} is neither a file nor a folder")
    exts = {e.lower() for e in extensions}
    files: list[str] = []
    skipped: list[Skip] = []

    def walk(folder: str, hidden: bool) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError as err:
            skipped.append(Skip(folder, "vanished", f"folder gone before it was read: {err.strerror}"))
            return
        except OSError as err:
            skipped.append(Skip(folder, "unreadable", f"folder not readable: {err.strerror}"))
            return
        for e in entries:
            path = os.path.join(folder, e.name)
            hid = hidden or e.name.startswith(".")
            try:
                if e.is_dir(follow_symlinks=False):
                    walk(path, hid)
                    continue
            except OSError as err:
                skipped.append(Skip(path, "vanished", err.strerror or str(err)))
                continue
            if hid:
                skipped.append(Skip(path, "hidden", "dot-file" if e.name.startswith(".") else "inside a dot-folder"))
                continue
            try:
                st = os.stat(path)  # through the link
            except FileNotFoundError as err:
                if os.path.islink(path):
                    skipped.append(Skip(path, "broken_symlink", f"-> {os.readlink(path)}"))
                else:
                    skipped.append(Skip(path, "vanished", err.strerror or str(err)))
                continue
            except OSError as err:
                if err.errno == errno.ELOOP:
                    skipped.append(Skip(path, "symlink_loop", f"-> {os.readlink(path)}"))
                else:
                    skipped.append(Skip(path, "unreadable", err.strerror or str(err)))
                continue
            if stat.S_ISDIR(st.st_mode):
                skipped.append(Skip(path, "not_a_file", f"symlink to a folder, not followed: -> {os.readlink(path)}"))
            elif not stat.S_ISREG(st.st_mode):
                kind = next((name for test, name in _FILE_TYPES if test(st.st_mode)), f"mode {st.st_mode:o}")
                skipped.append(Skip(path, "not_a_file", kind))
            elif os.path.splitext(e.name)[1].lower() not in exts:
                skipped.append(Skip(path, "extension", os.path.splitext(e.name)[1] or "(no extension)"))
            else:
                files.append(path)

    walk(str(root), False)
    return sorted(files, key=_path_order), sorted(skipped, key=lambda k: _path_order(k.uri))


def config_json(cfg: CurateConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)


def _scoring_config(cfg: CurateConfig) -> str:
    """The parts of the config that change results (not where the output goes or how Ray is laid out)."""
    d = dataclasses.asdict(cfg)
    d["run"] = {"stages": d["run"]["stages"]}
    d.pop("ray")
    return json.dumps(d, sort_keys=True, default=str)


def make_run_id(cfg: CurateConfig, inputs: list[str]) -> str:
    h = hashlib.sha256(_scoring_config(cfg).encode())
    for u in inputs:
        h.update(os.fsencode(u) + b"\0")
    return "run-" + h.hexdigest()[:12]


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rows_for(table: str, records: list[dict[str, Any]], run_id: str) -> pa.Table:
    rows = []
    for rec in records:
        # Text from file names (paths in messages too) may hold bytes that are not UTF-8: Parquet needs UTF-8.
        rec = {k: shown(v) if isinstance(v, str) else v for k, v in rec.items()}
        rec["run_id"] = run_id
        for k in ("models", "stage_versions"):
            if isinstance(rec.get(k), dict):
                rec[k] = sorted(rec[k].items())
        rows.append(rec)
    return schema.to_table(table, rows)


class PartWriter:
    """Collects rows as they stream out of Ray and writes an input's parts once all its rows have arrived."""

    def __init__(self, out: Path, run_id: str, scoring_hash: str, uris: dict[str, str],
                 progress: Progress | None = None, overlay_max: float | None = None) -> None:
        # the [prefilter] cut the video-level overlay evidence is judged by when a video's clips are written
        self.overlay_max = overlay_max
        self.parts = out / "_parts"
        self.run_id = run_id
        self.scoring_hash = scoring_hash
        self.uris = uris
        self.pending: dict[str, dict[str, Any]] = {}
        self.done = 0
        self.total = len(uris)
        self.progress = progress

    def marker(self, key: str) -> Path:
        return self.parts / "done" / f"{key}.json"

    def is_done(self, key: str, uri: str) -> bool:
        m = self.marker(key)
        if not m.exists():
            return False
        try:
            info = json.loads(m.read_text())
            st = os.stat(uri)
        except (OSError, json.JSONDecodeError):
            return False
        return (info.get("scoring") == self.scoring_hash and info.get("size") == st.st_size
                and info.get("mtime_ns") == st.st_mtime_ns)

    def add(self, row: dict[str, Any]) -> None:
        key = row["uri_key"]
        p = self.pending.setdefault(key, {"video": None, "reject": None, "clips": [], "expect": None})
        rec = json.loads(row["record"])
        if row["kind"] == "reject":
            # expect: clip rows the input streamed before failing; they are waited for, then dropped
            p["reject"], p["expect"] = rec, int(row["expect"])
        elif row["kind"] == "video":
            p["video"], p["expect"] = rec, int(row["expect"])
        else:
            rec["preview_jpeg"] = bytes(row["preview"]) or None
            p["clips"].append(rec)
        if p["expect"] is not None and len(p["clips"]) == p["expect"]:
            self._flush(key, p)

    def _flush(self, key: str, p: dict[str, Any]) -> None:
        uri = self.uris[key]
        if p["reject"] is not None:
            _atomic_write_table(_rows_for("rejects", [p["reject"]], self.run_id), self.parts / "rejects" / f"{key}.parquet")
            status = f"rejected at {p['reject']['stage']}: {p['reject']['error_class']}: {p['reject']['message']}"
        else:
            # The video row comes last: only now is its overlay evidence across scenes known to its clips.
            clips = sorted((apply_video_overlay(c, p["video"], self.overlay_max) for c in p["clips"]),
                           key=lambda r: r["start_frame"])
            _atomic_write_table(_rows_for("clips", clips, self.run_id), self.parts / "clips" / f"{key}.parquet")
            _atomic_write_table(_rows_for("videos", [p["video"]], self.run_id), self.parts / "videos" / f"{key}.parquet")
            kept = sum(1 for c in clips if not c["reject_reasons"])
            status = f"{len(clips)} clips, {kept} kept"
        try:
            st = os.stat(uri)
        except OSError:
            st = None  # gone since it was read (its rows say so): no marker, so a resumed run looks again
        if st is not None:
            _atomic_write_text(json.dumps({"uri": shown(uri), "scoring": self.scoring_hash, "size": st.st_size,
                                           "mtime_ns": st.st_mtime_ns, "run_id": self.run_id}), self.marker(key))
        del self.pending[key]
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, shown(uri), status)
        else:
            log(f"[{self.done}] {shown(Path(uri).name)}: {status}")


def _read_parts(folder: Path, table: str) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return schema.empty(table)
    return pa.concat_tables([pq.read_table(f, schema=schema.TABLES[table]) for f in files])


def consolidate(out: Path, uris: set[str], *, run_id: str | None = None, known_runs: set[str] | None = None
                ) -> dict[str, int]:
    """Rebuild the tables from the parts of the current inputs (``uris`` as the tables show them).

    One row per video id (a renamed copy of a file becomes a `dedup` reject), rows sorted by id so a resumed
    run writes exactly what an uninterrupted one does. With ``known_runs``, a part naming a run outside it (written
    by a version that did not record attempts before their work) is re-stamped ``run_id``: no row may name a run
    that has no ``runs`` row.
    """
    parts = out / "_parts"
    videos = [v for v in _read_parts(parts / "videos", "videos").to_pylist() if v["uri"] in uris]
    rejects = [r for r in _read_parts(parts / "rejects", "rejects").to_pylist() if r["uri"] in uris]
    clips = _read_parts(parts / "clips", "clips").to_pylist()
    by_id: dict[str, list[dict]] = {}
    for v in videos:
        by_id.setdefault(v["video_id"], []).append(v)
    keep_videos = []
    for vid, rows in by_id.items():
        rows.sort(key=lambda r: r["uri"])
        keep_videos.append(rows[0])
        for dup in rows[1:]:
            rejects.append({"uri": dup["uri"], "video_id": vid, "stage": "dedup", "error_class": "DuplicateContent",
                            "message": f"same content as {rows[0]['uri']} (video_id {vid})", "run_id": dup["run_id"]})
    kept_ids = {v["video_id"] for v in keep_videos}
    seen_clips: dict[str, dict] = {}
    for c in clips:
        if c["video_id"] in kept_ids:
            seen_clips.setdefault(c["clip_id"], c)
    keep_videos.sort(key=lambda r: r["video_id"])
    clip_rows = sorted(seen_clips.values(), key=lambda r: r["clip_id"])
    rejects.sort(key=lambda r: (r["uri"], r["stage"]))
    restamped = 0
    if known_runs is not None:
        for rows in (keep_videos, clip_rows, rejects):
            for r in rows:
                if r["run_id"] not in known_runs:
                    r["run_id"] = run_id
                    restamped += 1
    for name, rows in (("videos", keep_videos), ("clips", clip_rows), ("rejects", rejects)):
        _atomic_write_table(pa.Table.from_pylist(rows, schema=schema.TABLES[name]), out / f"{name}.parquet")
    reasons = Counter("reject:" + r.split(":")[0] for c in clip_rows for r in c["reject_reasons"])
    return {"videos": len(keep_videos), "clips": len(clip_rows), "rejects": len(rejects),
            "kept_clips": sum(1 for c in clip_rows if not c["reject_reasons"]), "restamped_rows": restamped,
            **reasons}


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("vidcurate", "ray", "torch", "pyarrow", "av", "decord", "scenedetect", "open-clip-torch",
                "transformers", "timm", "duckdb", "webdataset", "numpy", "opencv-python"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def resolve_sources(cfg: CurateConfig, out: Path) -> tuple[ModelSources, bool]:
    """Model locations for the stages. With ``models.standins`` the tiny random stand-ins are built and used."""
    m = cfg.models
    caption = cfg.caption
    if m.standins:
        from pipeline.models.standins import build_standins

        folder = Path(m.standin_dir) if m.standin_dir else out / "_standins"
        st = build_standins(folder)
        log(f"USING TINY RANDOM STAND-IN MODELS from {folder} (scores and captions are meaningless; "
            f"configure [models] standins=false and real weights for real curation)")
        if caption.backend != "openai":  # an endpoint is a real service, not something to stand in for
            caption = st.caption_config(prompt=caption.prompt, num_frames=caption.num_frames)
        # Random stand-ins give meaningless model scores: record them, but let no clip be dropped by them.
        prefilter = dataclasses.replace(cfg.prefilter, watermark_max=None, aesthetic_min=None, caption_similarity_min=None)
        return ModelSources(
            watermark=st.watermark, clip_model=st.clip_model, clip_pretrained=st.clip_pretrained,
            aesthetic_mlp=st.aesthetic_mlp, caption=caption, device=m.device,
            model_fps=cfg.decode.model_fps, prefilter=prefilter,
        ), True
    return ModelSources(
        watermark=m.watermark, clip_model=m.clip_model, clip_pretrained=m.clip_pretrained,
        aesthetic_mlp=m.aesthetic_mlp, caption=caption, device=m.device, model_fps=cfg.decode.model_fps,
        prefilter=cfg.prefilter,
    ), False


def init_ray(address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=addr, include_dashboard=False if addr == "local" else None, log_to_driver=True,
             logging_level="WARNING")


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: Path
    counts: dict[str, int]
    wall_seconds: float
    standins: bool


def _write_runs(runs_path: Path, row: dict[str, Any]) -> None:
    """Add this attempt's row to runs.parquet, or replace it (same run id and start time)."""
    runs = pq.read_table(runs_path, schema=schema.RUNS).to_pylist() if runs_path.exists() else []
    runs = [r for r in runs if (r["run_id"], r["started_at"]) != (row["run_id"], row["started_at"])]
    _atomic_write_table(pa.Table.from_pylist(runs + [row], schema=schema.RUNS), runs_path)


def curate(cfg: CurateConfig, *, limit: int | None = None, progress: Progress | None = None,
           after_listing: Callable[[list[str]], None] | None = None) -> RunSummary:
    """Run the curation ``cfg`` describes. ``limit``: only the first N inputs (sorted by path).
    ``progress(done, total, uri, status)`` is called as each input's rows are written (default: a log line).
    ``after_listing(inputs)``: called once the inputs are listed, before any is read (tests change the folder
    there, as a user may while a run goes on)."""
    import ray
    from ray.data import ActorPoolStrategy

    t0 = time.time()
    started = dt.datetime.now(dt.timezone.utc)  # microseconds, as Parquet keeps them: the attempt's row key
    out = Path(cfg.run.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in cfg.run.stages:  # fail before any work on a typo
        get_stage(name)

    input_root = cfg.run.input
    if not input_root:
        from pipeline.sample import generate_sample

        input_root = str(out / "sample_input")
        generate_sample(input_root)
        log(f"no --input given: curating the built-in generated sample in {input_root}")
    uris, skips = scan_inputs(input_root, cfg.run.extensions)
    uris = uris[:limit] if limit is not None else uris
    run_id = make_run_id(cfg, uris)
    scoring_hash = hashlib.sha256(_scoring_config(cfg).encode()).hexdigest()[:16]
    keys = {uri_key(u): u for u in uris}
    writer = PartWriter(out, run_id, scoring_hash, keys, progress, overlay_max=cfg.prefilter.overlay_max)
    todo = [u for u in uris if not writer.is_done(uri_key(u), u)]
    writer.total = len(todo)
    skip_counts = Counter(k.reason for k in skips)
    log(f"run {run_id}: {len(uris)} inputs ({len(uris) - len(todo)} already done, {len(todo)} to process, "
        f"{len(skips)} skipped: {dict(sorted(skip_counts.items()))})")

    # This attempt's runs row goes in before any part can name the run, so a kill at any point leaves no row
    # naming a run without one; it is completed (finished_at, counts) at the end.
    runs_path = out / "runs.parquet"
    run_row = {
        "run_id": run_id, "started_at": started, "finished_at": None, "wall_seconds": None,
        "input": shown(str(input_root)), "output": shown(str(out)), "config": shown(config_json(cfg)),
        "package_versions": json.dumps(_versions(), sort_keys=True), "counts": json.dumps({"status": "running"}),
        "standin_models": bool(cfg.models.standins),
    }
    _write_runs(runs_path, run_row)
    if after_listing is not None:
        after_listing(list(uris))

    standins = False
    if todo:
        sources, standins = resolve_sources(cfg, out) if cfg.run.stages else (None, cfg.models.standins)
        init_ray(cfg.ray.address)
        # The name's bytes travel (Arrow strings must be UTF-8, file names need not be).
        ds = ray.data.from_items([{"path": os.fsencode(u)} for u in todo], override_num_blocks=len(todo))
        ds = ds.flat_map(analyze_row, fn_kwargs={"cfg": cfg}, num_cpus=cfg.ray.task_cpus)
        gpus = cfg.models.num_gpus
        for name in cfg.run.stages:
            ds = ds.map_batches(
                get_stage(name), fn_constructor_kwargs={"sources": sources}, batch_size=cfg.ray.batch_size,
                batch_format="numpy", compute=ActorPoolStrategy(size=cfg.ray.actors_per_stage),
                num_cpus=cfg.ray.actor_cpus, num_gpus=gpus or None,
            )
        for row in ds.iter_rows():
            writer.add(row)
        if writer.pending:
            raise RuntimeError(f"inputs left incomplete after the dataset finished: {sorted(writer.pending)}")
    elif cfg.models.standins:
        standins = True

    known_runs = set(pq.read_table(runs_path, columns=["run_id"]).column("run_id").to_pylist())
    counts = consolidate(out, {shown(u) for u in uris}, run_id=run_id, known_runs=known_runs)
    _atomic_write_table(schema.to_table("skipped", [dict(k.row(), run_id=run_id) for k in skips]),
                        out / "skipped.parquet")
    counts.update(inputs=len(uris), processed_now=len(todo), resumed_skipped=len(uris) - len(todo),
                  ignored_extension=skip_counts.get("extension", 0), skipped=len(skips),
                  **{f"skipped:{r}": n for r, n in sorted(skip_counts.items())})
    wall = time.time() - t0
    run_row.update(finished_at=dt.datetime.now(dt.timezone.utc), wall_seconds=wall,
                   counts=json.dumps(counts, sort_keys=True), standin_models=standins)
    _write_runs(runs_path, run_row)
    log(f"done in {wall:.1f}s: {counts['videos']} videos, {counts['clips']} clips ({counts['kept_clips']} kept), "
        f"{counts['rejects']} rejects, {len(skips)} skipped -> {shown(str(out))}")
    return RunSummary(run_id, out, counts, wall, standins)
