"""A training stage whose data is a SQL predicate over the catalog (CogVideoX's high-quality fine-tune).

A stage TOML (``jobs/configs/dit_hq.toml``) carries a ``[selection]`` table beside the trainer's own sections::

    [selection]
    catalog = "out/catalog.duckdb"
    where = "aesthetic_mean >= 5.5 AND overlay_score < 0.2 AND motion_mean BETWEEN 1 AND 40"
    output = "out/shards_hq"                 # built here, or reused when it already holds this selection
    shards_config = "jobs/configs/shards.toml"

``jobs.train`` then selects those kept clips (``catalog.shard_index.select_clips``), builds or reuses their
shards with the shard job's machinery, trains on them (``[data] root`` is set to ``output``), writes
``lineage.json`` (selection SQL, row count, sha256 of the selected clip ids) into the final checkpoint and
records the checkpoint and its clips in the catalog (``catalog.db.register_checkpoint``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.config import from_dict, load_section
from jobs import _cli

DEFAULT_SHARDS_CONFIG = Path(__file__).resolve().parent / "configs" / "shards.toml"
LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class SelectionConfig:
    """``[selection]`` of a stage TOML."""

    catalog: str = ""
    """Catalog DuckDB file (jobs.curate writes OUT/catalog.duckdb)."""
    where: str = ""
    """SQL condition over kept_clips."""
    output: str = ""
    """Shard folder of the selection (built, or reused when it already holds the same selection)."""
    shards_config: str = str(DEFAULT_SHARDS_CONFIG)
    """TOML with the shard job's [buckets], [shards], [ray] sections."""

    def __post_init__(self) -> None:
        for name in ("catalog", "where", "output"):
            if not getattr(self, name).strip():
                raise ValueError(f"[selection] {name}: expected a value, got an empty string")


@dataclass(frozen=True, slots=True)
class Selection:
    """What a selection gave: the shard folder and the clips, as they are stored in the checkpoint and catalog."""

    config: SelectionConfig
    root: Path
    rows: int
    clip_ids_sha256: str
    status: str  # "written" or "unchanged"
    samples: int

    def record(self) -> dict[str, Any]:
        return {"where": self.config.where, "catalog": str(Path(self.config.catalog).resolve()),
                "rows": self.rows, "clip_ids_sha256": self.clip_ids_sha256, "shards": str(self.root)}


def split(data: dict[str, Any]) -> tuple[SelectionConfig | None, dict[str, Any]]:
    """(the ``[selection]`` table, the rest for the trainer's config) of a parsed stage TOML."""
    rest = dict(data)
    table = rest.pop("selection", None)
    if table is None:
        return None, rest
    return from_dict(SelectionConfig, dict(table), where="selection"), rest


def build(sel: SelectionConfig, address: str) -> Selection:
    """Select the clips and build (or reuse) their shards; the catalog records the shards."""
    from catalog.db import clip_ids_sha256
    from catalog.shard_index import SelectionError, register_output, select_clips
    from jobs.shards import RayConfig, ray_render_many
    from pipeline.buckets import BucketConfig
    from pipeline.shards import OutputConflictError, ShardConfig, build_shards

    buckets = _cli.load_config(load_section, BucketConfig, sel.shards_config, "buckets")
    shards = _cli.load_config(load_section, ShardConfig, sel.shards_config, "shards")
    ray_cfg = _cli.load_config(load_section, RayConfig, sel.shards_config, "ray")
    try:
        rows = select_clips(sel.catalog, sel.where)
    except (SelectionError, FileNotFoundError) as err:
        raise _cli.UsageError(f"[selection] {err}") from None
    if not rows:
        raise _cli.UsageError(f"[selection] where {sel.where!r} selects no kept clips in {sel.catalog}")
    out = Path(sel.output).expanduser().resolve()
    print(f"selection: {len(rows)} kept clips match {sel.where!r}", flush=True)
    sessions: list[_cli.RaySession] = []
    try:
        result = build_shards(rows, out, where=sel.where, buckets=buckets, shards=shards,
                              render_many=ray_render_many(ray_cfg, address, out, sessions))
    except OutputConflictError as err:
        raise _cli.UsageError(f"[selection] output: {err}") from None
    finally:
        for s in sessions:
            s.close()
    register_output(sel.catalog, out)
    m = result.manifest
    print(f"selection: {'reused' if result.status == 'unchanged' else 'wrote'} {m['samples']} samples in "
          f"{m['shards']} tars under {out} ({len(m['skipped'])} clips fit no bucket)", flush=True)
    return Selection(sel, out, len(rows), clip_ids_sha256(r["clip_id"] for r in rows), result.status, m["samples"])


def record(sel: Selection, checkpoint: str | Path, *, cfg: Any, run: str, stage: str, metrics: dict[str, Any]) -> int:
    """Write ``lineage.json`` into the checkpoint and register it in the catalog; returns the clips recorded."""
    import dataclasses

    from catalog.db import register_checkpoint

    ckpt = Path(checkpoint)
    (ckpt / LINEAGE_FILE).write_text(json.dumps({"selection": sel.record(), "run": run, "stage": stage}, indent=1))
    rec = register_checkpoint(
        sel.config.catalog, checkpoint=ckpt, run=run, stage=stage, kind=cfg.stage.kind,
        step=int(metrics.get("step", 0)), config=dataclasses.asdict(cfg), shards_output=sel.root,
        buckets=cfg.data.buckets, init_from=getattr(cfg.train, "init_from", "") or None, selection=sel.config.where,
        selection_rows=sel.rows, selection_sha256=sel.clip_ids_sha256,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    )
    return rec.distinct_clips
