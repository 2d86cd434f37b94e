"""Curation job: raw videos and images in, scored and captioned clip tables out.

    python -m jobs.curate                                   # built-in sample, in-process Ray, tiny stand-in models
    python -m jobs.curate --input RAW --output OUT --config jobs/configs/curate.toml
    ray job submit --working-dir . -- python -m jobs.curate --input RAW --output OUT
"""
from __future__ import annotations

import argparse
import sys

from catalog.config import ConfigError
from pipeline.settings import CurateConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.curate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML config (sections run, decode, scenecut, prefilter, models, caption, ray)")
    ap.add_argument("--input", help="folder or file of raw videos/images (default: the built-in generated sample)")
    ap.add_argument("--output", help="output folder (default: [run].output, out/curate)")
    ap.add_argument("--no-catalog", action="store_true", help="do not register the run in OUT/catalog.duckdb")
    args = ap.parse_args(argv)

    run: dict[str, object] = {}
    if args.input:
        run["input"] = args.input
    if args.output:
        run["output"] = args.output
    if args.no_catalog:
        run["register_catalog"] = False
    try:
        cfg = CurateConfig.load(args.config, {"run": run})
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from pipeline.run import curate

    summary = curate(cfg)
    if cfg.run.register_catalog:
        from catalog.db import register_run

        db = summary.output / "catalog.duckdb"
        register_run(db, summary.output)
        print(f"catalog: {db}  (try: python -m catalog {db} \"SELECT reject_reasons, count(*) FROM clips GROUP BY ALL\")")
    c = summary.counts
    print(f"run {summary.run_id}: {c['inputs']} inputs -> {c['videos']} videos, {c['clips']} clips, "
          f"{c['kept_clips']} kept, {c['rejects']} rejects in {summary.wall_seconds:.1f}s"
          + ("  [tiny stand-in models]" if summary.standins else ""))
    print(f"tables: {summary.output}/{{videos,clips,rejects,runs}}.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
