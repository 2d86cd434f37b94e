"""Curation job: raw videos and images in, scored and captioned clip tables out.

    python -m jobs.curate                                   # built-in sample, in-process Ray, tiny stand-in models
    python -m jobs.curate --input RAW --output OUT --config jobs/configs/curate.toml
    python -m jobs.curate --input RAW --output OUT --dry-run    # what would be processed, touching nothing
    ray job submit --working-dir . -- python -m jobs.curate --input /abs/RAW --output /abs/OUT

One line per input as it completes, Ray's own output in OUT/ray.log, a summary table at the end.
Exit status: 0 done, 2 bad arguments or config (one line on stderr).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from jobs import _cli
from pipeline.settings import CurateConfig


def _parser() -> _cli.ArgumentParser:
    ap = _cli.ArgumentParser(prog="python -m jobs.curate", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config (sections run, decode, scenecut, prefilter, models, caption, ray)")
    ap.add_argument("--input", help="folder or file of raw videos/images (default: the built-in generated sample)")
    ap.add_argument("--output", help="output folder (default: [run].output, out/curate)")
    ap.add_argument("--no-catalog", action="store_true", help="do not register the run in OUT/catalog.duckdb")
    ap.add_argument("--limit", type=int, metavar="N", help="process only the first N inputs (sorted by path)")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the inputs that would be processed and where the outputs would go; touch nothing")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an in-process cluster)")
    return ap


def _skip_counts(counts: dict[str, int]) -> dict[str, int]:
    """{reason: n} of the run's ``skipped`` rows, from its counts (``skipped:<reason>``, as pipeline.run keeps them)."""
    return {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("skipped:")}


def _dry_run(cfg: CurateConfig, limit: int | None) -> int:
    from pipeline.analyze import shown, uri_key
    from pipeline.run import PartWriter, _scoring_config, make_run_id, scan_inputs

    out = Path(cfg.run.output).expanduser().resolve()
    print("dry run: nothing is read beyond the file listing, nothing is written")
    if not cfg.run.input:
        print(f"  input:  none given; the built-in sample would be generated into {shown(str(out / 'sample_input'))}")
        uris: list[str] = []
        skips = []
    else:
        try:
            uris, skips = scan_inputs(cfg.run.input, cfg.run.extensions)
        except FileNotFoundError as err:
            raise _cli.UsageError(f"--input: {err}") from None
        print(f"  input:  {shown(str(Path(cfg.run.input).expanduser().resolve()))}")
    limited = uris[limit:] if limit is not None else []
    uris = uris[:limit] if limit is not None else uris
    run_id = make_run_id(cfg, uris)
    writer = PartWriter(out, run_id, hashlib.sha256(_scoring_config(cfg).encode()).hexdigest()[:16],
                        {uri_key(u): u for u in uris})
    done = [u for u in uris if writer.is_done(uri_key(u), u)]
    # File names need not be UTF-8: print them escaped (pipeline.analyze.shown), as the tables and logs show them.
    for u in uris:
        print(f"  {'done   ' if u in done else 'process'}  {shown(u)}")
    for k in skips:
        why = "extension not in [run] extensions" if k.reason == "extension" else "skipped"
        print(f"  ignore   {shown(k.uri)}  ({k.reason}: {shown(k.detail)}; {why})")
    for u in limited:
        print(f"  skip     {shown(u)}  (beyond --limit {limit})")
    o = shown(str(out))
    print(f"  output: {o}/{{videos,clips,rejects,skipped,runs}}.parquet, {o}/_parts/, {o}/ray.log"
          + ("" if not cfg.run.register_catalog else f", {o}/catalog.duckdb"))
    reasons: dict[str, int] = {}
    for k in skips:
        reasons[k.reason] = reasons.get(k.reason, 0) + 1
    _cli.summary_table("would do", [
        ("inputs", len(uris)), ("to process", len(uris) - len(done)), ("already done", len(done)),
        ("skipped", f"{len(skips)}: {_cli.by_reason(reasons)}" if skips else "none"),
        ("beyond --limit", len(limited)), ("run id", run_id),
    ])
    return 0


def _summary(summary, out: Path, catalog: Path | None, wall: float) -> None:
    import pyarrow.parquet as pq

    c = summary.counts
    clip_reasons = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("reject:")}
    rejects = pq.read_table(out / "rejects.parquet", columns=["stage", "error_class"]).to_pylist()
    input_reasons: dict[str, int] = {}
    for r in rejects:
        key = f"{r['stage']}:{r['error_class']}"
        input_reasons[key] = input_reasons.get(key, 0) + 1
    outputs = f"{out}/{{videos,clips,rejects,skipped,runs}}.parquet"
    if catalog is not None:
        outputs += f"\n{catalog}"
    _cli.summary_table(f"run {summary.run_id}" + ("  [tiny stand-in models]" if summary.standins else ""), [
        ("inputs", f"{c['inputs']} ({c['processed_now']} processed now, {c['resumed_skipped']} already done)"),
        ("skipped", f"{c['skipped']}: {_cli.by_reason(_skip_counts(c))}" if c.get("skipped") else "none"),
        ("videos", c["videos"]),
        ("clips kept", f"{c['kept_clips']} of {c['clips']}"),
        ("clip rejects", _cli.by_reason(clip_reasons)),
        ("input rejects", f"{c['rejects']}: {_cli.by_reason(input_reasons)}" if c["rejects"] else "none"),
        ("outputs", outputs),
        ("wall time", f"{wall:.1f}s"),
    ])


def _check_layout(cfg: CurateConfig, session: _cli.RaySession) -> None:
    """Ray Data keeps every model actor alive for the whole run: if they and one decode task do not fit in the
    cluster's CPUs at once, the decode task is never scheduled and the run waits for ever. On an in-process
    cluster (its size is final) that is refused; on a joined one (it may scale up) it is a warning line."""
    n_actors = len(cfg.run.stages) * cfg.ray.actors_per_stage
    need = cfg.ray.task_cpus + n_actors * cfg.ray.actor_cpus
    if not session.cpus or need <= session.cpus + 1e-9:
        return
    msg = (f"[ray] layout needs {need:g} CPUs at once (one {cfg.ray.task_cpus:g}-CPU decode task beside {n_actors} "
           f"model actors of {cfg.ray.actor_cpus:g} CPU) but the cluster has {session.cpus:g}: the decode task would "
           f"never be scheduled; lower [ray] task_cpus or actor_cpus")
    if session.address == "local":
        raise _cli.UsageError(msg)
    print(f"warning: {msg} (or let the cluster scale up)", file=sys.stderr, flush=True)


@_cli.entry
def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise _cli.UsageError(f"--limit: expected a positive number of inputs, got {args.limit}")
    run: dict[str, object] = {}
    if args.input:
        run["input"] = args.input
    if args.output:
        run["output"] = args.output
    if args.no_catalog:
        run["register_catalog"] = False
    cfg = _cli.load_config(CurateConfig.load, args.config, {"run": run})
    _cli.refuse_relative_paths({
        "--input": cfg.run.input if args.input else None, "[run] input": cfg.run.input if not args.input else None,
        "--output": cfg.run.output if args.output else None,
        "[run] output (no --output given)": cfg.run.output if not args.output else None,
        "[models] standin_dir": cfg.models.standin_dir,
    })
    if args.dry_run:
        return _dry_run(cfg, args.limit)

    from pipeline.run import curate

    out = Path(cfg.run.output).expanduser().resolve()
    ray_session = _cli.start_ray(_cli.ray_address(args.address, cfg.ray.address), out)
    print(ray_session.describe(), flush=True)
    try:
        _check_layout(cfg, ray_session)
    except _cli.UsageError:
        ray_session.close()
        raise

    def progress(done: int, total: int, uri: str, status: str) -> None:
        print(f"[{done}/{total}] {Path(uri).name}: {status}", flush=True)

    try:
        summary = curate(cfg, limit=args.limit, progress=progress)
    finally:
        ray_session.close()
    catalog = None
    if cfg.run.register_catalog:
        from catalog.db import register_run

        catalog = summary.output / "catalog.duckdb"
        register_run(catalog, summary.output)
    _summary(summary, summary.output, catalog, time.time() - t0)
    if catalog is not None:
        print(f"try: python -m catalog {catalog} \"SELECT reject_reasons, count(*) FROM clips GROUP BY ALL\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
