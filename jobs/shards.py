"""Shard job: a SQL selection over kept_clips in, bucketed WebDataset tars and catalog rows out.

    python -m jobs.shards --catalog OUT/catalog.duckdb --where "aesthetic_mean >= 5.0" --output OUT/shards
    ray job submit --working-dir . -- python -m jobs.shards --catalog ... --where ... --output ...

Clip encoding runs as Ray tasks (``[ray] task_cpus`` each, no actors holding CPUs); the driver writes
the tars in clip order, so the same selection gives the same bytes. Re-running the same selection into
the same output changes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from catalog.config import ConfigError, load_section
from pipeline.buckets import BucketConfig, BucketConfigError
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


def ray_render_many(ray_cfg: RayConfig, started: list[bool]):
    """A ``RenderMany`` that encodes on Ray and yields results in submission order.

    Ray starts on the first call only, so a re-run that finds the output up to date costs no cluster
    start. Under ``ray job submit`` RAY_ADDRESS names the cluster; otherwise an in-process one starts
    ("local" rather than auto, so a stale cluster file from an earlier ``ray start`` is ignored).
    ``started`` records whether this call started Ray (the caller shuts it down).
    """

    def render_many(clips: Sequence[PlannedClip], cfg: ShardConfig) -> Iterator[RenderResult]:
        import ray

        if not clips:
            return
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS", "local")
            ray.init(address=address, log_to_driver=False)
            started.append(True)
            where = "in-process cluster" if address == "local" else f"connected to {address}"
            print(f"ray: {where}, {ray.cluster_resources().get('CPU', 0):g} CPUs,"
                  f" {ray_cfg.task_cpus:g} per encode task", flush=True)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True, help="catalog DuckDB file (jobs.curate writes OUT/catalog.duckdb)")
    ap.add_argument("--where", required=True, help="SQL condition over kept_clips, e.g. \"aesthetic_mean >= 5.0\"")
    ap.add_argument("--output", required=True, help="shard output folder")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML with [buckets], [shards], [ray]")
    ap.add_argument("--overwrite", action="store_true", help="replace shards of a different selection in --output")
    args = ap.parse_args(argv)

    try:
        buckets = load_section(BucketConfig, args.config, "buckets")
        shards = load_section(ShardConfig, args.config, "shards")
        ray_cfg = load_section(RayConfig, args.config, "ray")
    except (ConfigError, BucketConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from catalog.shard_index import SelectionError, register_output, select_clips
    from pipeline.shards import build_shards

    try:
        rows = select_clips(args.catalog, args.where)
    except (SelectionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shards: {len(rows)} kept clips match {args.where!r}", flush=True)

    started: list[bool] = []
    try:
        result = build_shards(rows, args.output, where=args.where, buckets=buckets, shards=shards,
                              render_many=ray_render_many(ray_cfg, started), overwrite=args.overwrite,
                              progress=_progress())
    except OutputConflictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray

            ray.shutdown()

    index = register_output(args.catalog, args.output)
    m = result.manifest
    verb = "unchanged" if result.status == "unchanged" else "wrote"
    print(f"shards: {verb} {m['samples']} samples in {m['shards']} tars under {Path(args.output).resolve()}"
          f" ({len(m['buckets'])} buckets, {len(m['skipped'])} clips fit no bucket, {len(m['errors'])} errors)")
    for name, b in sorted(m["buckets"].items()):
        rate = f"{b['fps']:g} fps" if b["frames"] > 1 else "image"
        print(f"  {name} ({rate}): {b['samples']} samples, {len(b['shards'])} tars")
    for e in m["errors"][:10]:
        print(f"  error {e['clip_id']}: {e['error']}", file=sys.stderr)
    print(f"catalog: {'recorded' if index.changed else 'already had'} {index.shards} shards,"
          f" {index.samples} shard_samples rows in {args.catalog}")
    if rows and m["samples"] == 0 and m["errors"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
