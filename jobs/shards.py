"""Shard job: a SQL selection over kept_clips in, bucketed WebDataset tars and catalog rows out.

    python -m jobs.shards --catalog OUT/catalog.duckdb --output OUT/shards      # every kept clip
    python -m jobs.shards --catalog OUT/catalog.duckdb --where "aesthetic_mean >= 5.0" --output OUT/shards
    python -m jobs.shards ... --dry-run        # the buckets each clip would go to, touching nothing
    ray job submit --working-dir . -- python -m jobs.shards --catalog /abs/DB --where ... --output /abs/OUT

Clip encoding runs as Ray tasks (``[ray] task_cpus`` each, no actors holding CPUs); the driver writes
the tars in clip order, so the same selection gives the same bytes. Re-running the same selection into
the same output changes nothing. Ray's own output goes to OUT/ray.log; a summary table closes the run.
Exit status: 0 done, 1 no sample could be written, 2 bad arguments, config or selection (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from catalog.config import load_section
from jobs import _cli
from pipeline.buckets import BucketConfig
from pipeline.shards import OutputConflictError, PlannedClip, RenderResult, ShardConfig, render_clip

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "shards.toml"


@dataclass(frozen=True, kw_only=True, slots=True)
class RayConfig:
    """TOML section ``[ray]``."""

    task_cpus: float = 1.0
    """CPUs reserved per clip-encode task."""
    in_flight: int = 8
    """Encode tasks submitted ahead of the tar writer (bounds driver memory)."""


def _render_task(clip: PlannedClip, cfg: ShardConfig) -> RenderResult:
    return render_clip(clip, cfg)


def ray_render_many(ray_cfg: RayConfig, address: str, out_dir: Path, sessions: list[_cli.RaySession]):
    """A ``RenderMany`` that encodes on Ray and yields results in submission order.

    Ray starts on the first call only (by the jobs' one policy, ``_cli.start_ray``), so a re-run that finds the
    output up to date costs no cluster start. ``sessions`` receives the session started (the caller closes it).
    """

    def render_many(clips: Sequence[PlannedClip], cfg: ShardConfig) -> Iterator[RenderResult]:
        import ray

        if not clips:
            return
        if not sessions:
            sessions.append(_cli.start_ray(address, out_dir))
            print(f"{sessions[0].describe()}; {ray_cfg.task_cpus:g} CPUs per encode task", flush=True)
        task = ray.remote(num_cpus=ray_cfg.task_cpus)(_render_task)
        cfg_ref = ray.put(cfg)
        pending: deque = deque()
        for clip in clips:
            pending.append(task.remote(clip, cfg_ref))
            if len(pending) >= ray_cfg.in_flight:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    return render_many


def _progress() -> Callable[[int, int], None]:
    t0, last = time.perf_counter(), [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= 2.0:
            last[0] = now
            print(f"shards: {done}/{total} clips ({done / max(now - t0, 1e-9):.1f} clips/s)", flush=True)

    return report


def _parser() -> _cli.ArgumentParser:
    ap = _cli.ArgumentParser(prog="python -m jobs.shards", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True, help="catalog DuckDB file (jobs.curate writes OUT/catalog.duckdb)")
    ap.add_argument("--where", default="true",
                    help="SQL condition over kept_clips, e.g. \"aesthetic_mean >= 5.0\" (default: every kept clip)")
    ap.add_argument("--output", required=True, help="shard output folder")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML with [buckets], [shards], [ray]")
    ap.add_argument("--overwrite", action="store_true", help="replace shards of a different selection in --output")
    ap.add_argument("--limit", type=int, metavar="N", help="only the first N selected clips (by clip id)")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the bucket each selected clip would go to and where the tars would be; write nothing")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an in-process cluster)")
    return ap


def _dry_run(rows: list[dict], out: Path, where: str, buckets: BucketConfig, shards: ShardConfig) -> int:
    from catalog.shards import read_manifest
    from pipeline.shards import plan_shards, selection_hash

    plan = plan_shards(rows, buckets)
    try:
        old = read_manifest(out)
    except ValueError as err:
        old = {"selection_hash": None, "where": f"unreadable manifest: {err}"}
    state = "empty or absent"
    if old is not None:
        same = old.get("selection_hash") == selection_hash(plan, where, buckets, shards)
        state = "holds this selection (a run would check it and change nothing if complete)" if same else \
            f"holds another selection ({old.get('where')!r}): a run needs --overwrite"
    print("dry run: the catalog was read, nothing was written")
    per_bucket: dict[str, int] = {}
    for c in plan.clips:
        per_bucket[c.bucket.name] = per_bucket.get(c.bucket.name, 0) + 1
        at = f" (stride {c.stride}, {c.bucket.fps:g} fps)" if c.stride != 1 else ""
        print(f"  {c.row['clip_id']}{at}  ->  {out}/{c.bucket.name}/")
    for clip_id, reason in plan.skipped:
        print(f"  {clip_id}  fits no bucket: {reason}")
    _cli.summary_table("would do", [
        ("clips selected", len(rows)), ("to write", len(plan.clips)), ("fit no bucket", len(plan.skipped)),
        ("buckets", _cli.by_reason(per_bucket)), ("output", f"{out} ({state})"),
    ])
    return 0


@_cli.entry
def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise _cli.UsageError(f"--limit: expected a positive number of clips, got {args.limit}")
    buckets = _cli.load_config(load_section, BucketConfig, args.config, "buckets")
    shards = _cli.load_config(load_section, ShardConfig, args.config, "shards")
    ray_cfg = _cli.load_config(load_section, RayConfig, args.config, "ray")
    _cli.refuse_relative_paths({"--catalog": args.catalog, "--output": args.output})

    from catalog.shard_index import SelectionError, register_output, select_clips
    from pipeline.shards import build_shards

    try:
        rows = select_clips(args.catalog, args.where)
    except (SelectionError, FileNotFoundError) as err:
        raise _cli.UsageError(str(err)) from None
    where = args.where
    if args.limit is not None and len(rows) > args.limit:
        rows, where = rows[:args.limit], f"{args.where} (first {args.limit} by clip_id)"
    out = Path(args.output).expanduser().resolve()
    print(f"shards: {len(rows)} kept clips match {where!r}", flush=True)
    if args.dry_run:
        return _dry_run(rows, out, where, buckets, shards)

    sessions: list[_cli.RaySession] = []
    try:
        result = build_shards(rows, args.output, where=where, buckets=buckets, shards=shards,
                              render_many=ray_render_many(ray_cfg, _cli.ray_address(args.address), out, sessions),
                              overwrite=args.overwrite, progress=_progress())
    except OutputConflictError as err:
        raise _cli.UsageError(str(err)) from None
    finally:
        for s in sessions:
            s.close()

    index = register_output(args.catalog, args.output)
    m = result.manifest
    verb = "unchanged" if result.status == "unchanged" else "wrote"
    print(f"shards: {verb} {m['samples']} samples in {m['shards']} tars under {out}"
          f" ({len(m['buckets'])} buckets, {len(m['skipped'])} clips fit no bucket, {len(m['errors'])} errors)")
    for name, b in sorted(m["buckets"].items()):
        strides = buckets.strides_for(b["frames"])
        rate = "image" if b["frames"] == 1 else f"{b['fps']:g} fps" if strides == (1,) else \
            f"{b['fps']:g} fps at strides {', '.join(map(str, strides))}"
        print(f"  {name} ({rate}): {b['samples']} samples, {len(b['shards'])} tars")
    for e in m["errors"][:10]:
        print(f"  error {e['clip_id']}: {e['error']}", file=sys.stderr)
    print(f"catalog: {'recorded' if index.changed else 'already had'} {index.shards} shards,"
          f" {index.samples} shard_samples rows in {args.catalog}")
    skipped: dict[str, int] = {}
    for s in m["skipped"]:
        reason = str(s["reason"]).split(":")[0]
        skipped[reason] = skipped.get(reason, 0) + 1
    _cli.summary_table(f"shards {verb}", [
        ("inputs", f"{len(rows)} selected clips"),
        ("samples", f"{m['samples']} in {m['shards']} tars, {len(m['buckets'])} buckets"),
        ("skipped", f"{len(m['skipped'])} fit no bucket: {_cli.by_reason(skipped)}" if m["skipped"] else "none"),
        ("errors", len(m["errors"])),
        ("outputs", f"{out}/<FxHxW>/shard-NNNNNN.tar, {out}/manifest.json"),
        ("wall time", f"{time.time() - t0:.1f}s"),
    ])
    if rows and m["samples"] == 0 and m["errors"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
