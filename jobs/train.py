"""Train one stage (VAE today) on Ray Train.

    python -m jobs.train --config jobs/configs/vae_stage1.toml      # 17 frames at 256x256 + images
    python -m jobs.train --config jobs/configs/vae_stage2.toml      # 161 frames, from stage 1
    python -m jobs.train --config STAGE.toml --catalog OUT/catalog.duckdb   # lineage of a stage without [selection]
    python -m jobs.train --config jobs/configs/dit_distill.toml     # guidance + progressive distillation of a DiT
    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/vae_stage1.toml \
        --workers 8 --gpus-per-worker 1

The config's ``[stage] kind`` picks the trainer (``STAGES``; a file without ``[stage]`` is a VAE
stage). Each trainer module has ``config_from_dict(data)`` (its frozen stage config, with
``PATH_FIELDS``, ``ray`` and ``train.steps``) and ``train_loop_per_worker(config)`` (trainer/runtime.py).

Re-running the same config (same [ray] name and storage_path) resumes from the run's latest
checkpoint. A stage with ``[selection]`` records its checkpoint's lineage (tables ``checkpoints`` and
``checkpoint_clips``) in that selection's catalog; any other stage does so in ``--catalog`` when given, with the
clips of its ``[data] root`` shards in its buckets. Relative paths in the config are resolved against the current directory here, once,
so every worker sees the same absolute paths; under ``ray job submit`` that directory is Ray's temporary
working directory, so there the job refuses relative paths (naming the key) instead.
Console: the rank-0 metric line per logged step, Ray's own output in STORAGE/NAME/ray.log, a summary at the end.
Exit status: 0 done, 1 training failed, 2 bad arguments or config (one line on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from catalog.config import load_toml
from jobs import _cli, selection
from trainer.checkpoint import latest_checkpoint
from trainer.config import stage_kind

# [stage] kind -> the trainer module that runs it.
STAGES = {"vae": "trainer.train_vae", "dit": "trainer.train_dit", "dit_distill": "trainer.distill"}


def load_stage(path: str | Path) -> Any:
    """The frozen stage config of the TOML file at ``path``, built by the trainer its kind names."""
    _, data = selection.split(load_toml(path))  # [selection] is the job's (jobs/selection.py), not the trainer's
    kind = stage_kind(data)
    if kind not in STAGES:
        raise ValueError(f"[stage] kind: expected one of {sorted(STAGES)}, got {kind!r}")
    return importlib.import_module(STAGES[kind]).config_from_dict(data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="stage TOML, e.g. jobs/configs/vae_stage1.toml")
    p.add_argument("--workers", type=int, help="override [ray] workers (one process per GPU or CPU worker)")
    p.add_argument("--gpus-per-worker", type=float, help="override [ray] gpus_per_worker")
    p.add_argument("--cpus-per-worker", type=float, help="override [ray] cpus_per_worker")
    p.add_argument("--steps", type=int, help="override [train] steps")
    p.add_argument("--catalog", default=None,
                   help="catalog DuckDB file to record the final checkpoint's lineage in (checkpoints, "
                        "checkpoint_clips); a stage with [selection] records it in that selection's catalog")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else 'local': an in-process cluster)")
    return p.parse_args(argv)


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path and "://" not in path else path


def resolve(cfg: Any, args: argparse.Namespace) -> Any:
    """Apply command-line overrides and make every path (the config's ``PATH_FIELDS``) absolute."""
    ray_cfg = dataclasses.replace(
        cfg.ray,
        workers=args.workers if args.workers is not None else cfg.ray.workers,
        gpus_per_worker=args.gpus_per_worker if args.gpus_per_worker is not None else cfg.ray.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker if args.cpus_per_worker is not None else cfg.ray.cpus_per_worker,
    )
    train = dataclasses.replace(cfg.train, steps=args.steps if args.steps is not None else cfg.train.steps)
    cfg = dataclasses.replace(cfg, ray=ray_cfg, train=train)
    for dotted in type(cfg).PATH_FIELDS:
        section, name = dotted.split(".")
        part = getattr(cfg, section)
        part = dataclasses.replace(part, **{name: _abs(getattr(part, name))})
        cfg = dataclasses.replace(cfg, **{section: part})
    return cfg


def build_trainer(cfg: Any):
    """A TorchTrainer for ``cfg``; resumes from the latest checkpoint of the same run if there is one."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train's workers re-route print() through the root logger *and* tee it to stdout, so every metric
    # line reached the console twice; the driver's value of this variable is what its workers get.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    train_loop_per_worker = importlib.import_module(STAGES[cfg.stage.kind]).train_loop_per_worker
    use_gpu = cfg.ray.gpus_per_worker > 0
    resources = {"CPU": cfg.ray.cpus_per_worker} | ({"GPU": cfg.ray.gpus_per_worker} if use_gpu else {})
    previous = latest_checkpoint(Path(cfg.ray.storage_path) / cfg.ray.name) if "://" not in cfg.ray.storage_path else None
    if previous is not None:
        print(f"resuming {cfg.ray.name} from {previous}")
    # Ray Train v2 dropped resume_from_checkpoint: the loop gets the folder and loads it itself
    # (ray.train.get_checkpoint() still wins when Ray restarts workers inside this run).
    loop_config = dataclasses.asdict(cfg) | {"_threads_per_worker": max(1, int(cfg.ray.cpus_per_worker)),
                                               "_resume_from": str(previous) if previous is not None else ""}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=cfg.ray.name, storage_path=cfg.ray.storage_path),
    )


def _show_worker_line(line: str) -> str | None:
    """The workers' lines that are the job's own progress: rank-0 metric lines and rank notes."""
    if line.startswith("[rank "):
        return line
    if line.startswith("{") and '"step"' in line:
        try:
            metrics = json.loads(line)
        except json.JSONDecodeError:
            return None
        if isinstance(metrics, dict) and "step" in metrics:
            rest = "  ".join(f"{k}={v}" for k, v in metrics.items() if k != "step")
            return f"step {metrics['step']}: {rest}"
    return None


@_cli.entry
def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = parse_args(argv)
    raw = _cli.load_config(load_stage, args.config)
    _cli.refuse_relative_paths({f"[{d.split('.')[0]}] {d.split('.')[1]}": _path_value(raw, d)
                                for d in type(raw).PATH_FIELDS})
    sel_cfg = _cli.load_config(lambda p: selection.split(load_toml(p))[0], args.config)
    sel = None
    if sel_cfg is not None:
        _cli.refuse_relative_paths({"[selection] catalog": sel_cfg.catalog, "[selection] output": sel_cfg.output})
        sel = selection.build(sel_cfg, _cli.ray_address(args.address))
        raw = dataclasses.replace(raw, data=dataclasses.replace(raw.data, root=str(sel.root)))
    cfg = resolve(raw, args)
    catalog = lineage_catalog(args.catalog, sel_cfg, cfg)
    run_dir = Path(cfg.ray.storage_path) / cfg.ray.name if "://" not in cfg.ray.storage_path else None
    session = _cli.start_ray(_cli.ray_address(args.address), run_dir, show=_show_worker_line)
    print(session.describe(), flush=True)
    from ray.train import TrainingFailedError

    try:
        result = build_trainer(cfg).fit()
    except TrainingFailedError as err:  # Ray Train 2.x raises from fit(); it never returns a result with .error
        print(f"training failed: {failure_line(err)}", file=sys.stderr, flush=True)
        return 1
    finally:
        session.close()
    if result.error is not None:
        print(f"training failed: {failure_line(result.error)}", file=sys.stderr, flush=True)
        return 1
    step = result.metrics.get("step")
    if sel is not None and result.checkpoint is not None:
        n = selection.record(sel, result.checkpoint.path, cfg=cfg, run=cfg.ray.name, stage=cfg.ray.name,
                             metrics=dict(result.metrics))
        print(f"lineage: {n} clips of {sel.rows} selected ({sel.config.where!r}) recorded for "
              f"{result.checkpoint.path} in {sel.config.catalog}")
    elif catalog is not None and result.checkpoint is not None:
        n = record_lineage(catalog, result.checkpoint.path, cfg, dict(result.metrics))
        print(f"lineage: {n} clips of {cfg.data.root} ({', '.join(cfg.data.buckets)}) recorded for "
              f"{result.checkpoint.path} in {catalog}")
    _cli.summary_table(f"trained {cfg.ray.name} ({cfg.stage.kind})", [
        ("workers", f"{cfg.ray.workers} x ({cfg.ray.cpus_per_worker:g} CPU, {cfg.ray.gpus_per_worker:g} GPU)"),
        ("steps", f"{step} of {cfg.train.steps}"),
        ("checkpoint", result.checkpoint.path if result.checkpoint else "none"),
        ("wall time", f"{time.time() - t0:.1f}s"),
    ])
    print(f"done: step {step} checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return 0


def lineage_catalog(flag: str | None, sel_cfg: Any, cfg: Any) -> Path | None:
    """The catalog ``--catalog`` names, checked before any training: it must exist (an absent file would become
    an empty catalog whose clips the lineage rows name nothing of) and the stage's shards must have a manifest
    (the clips are read from it). With ``[selection]`` the lineage goes to the selection's catalog; a
    different ``--catalog`` is refused rather than silently ignored."""
    if flag is None:
        return None
    _cli.refuse_relative_paths({"--catalog": flag})
    path = Path(flag).expanduser().resolve()
    if sel_cfg is not None:
        if path != Path(sel_cfg.catalog).expanduser().resolve():
            raise _cli.UsageError(f"--catalog {flag}: this stage's [selection] records its lineage in "
                                  f"{sel_cfg.catalog}; expected no --catalog or that same file")
        return None
    if not path.is_file():
        raise _cli.UsageError(f"--catalog {flag}: expected a catalog file (jobs.curate writes OUT/catalog.duckdb), "
                              "found none")
    from catalog.shards import read_manifest

    try:
        manifest = read_manifest(cfg.data.root)
    except ValueError as err:
        raise _cli.UsageError(f"--catalog: [data] root {cfg.data.root}: {err}") from None
    if manifest is None:
        raise _cli.UsageError(f"--catalog: [data] root {cfg.data.root}: expected a shard folder with manifest.json "
                              "(the lineage lists the clips of its samples), found none")
    return path


def record_lineage(catalog: str | Path, checkpoint: str | Path, cfg: Any, metrics: dict[str, Any]) -> int:
    """Register ``checkpoint`` of the stage ``cfg`` and the clips of its ``[data] root`` shards in its buckets
    (tables checkpoints, checkpoint_clips); returns the distinct clips recorded."""
    from catalog.db import register_checkpoint

    rec = register_checkpoint(
        catalog, checkpoint=checkpoint, run=cfg.ray.name, stage=cfg.ray.name, kind=cfg.stage.kind,
        step=int(metrics.get("step", 0)), config=dataclasses.asdict(cfg), shards_output=cfg.data.root,
        buckets=cfg.data.buckets, init_from=getattr(cfg.train, "init_from", "") or None,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    )
    return rec.distinct_clips


def failure_line(err: BaseException) -> str:
    """Why training failed, as one line: the lowest failed rank's own exception (class and message), not Ray's
    wrapper and its tracebacks."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = failures[rank]
        cause = getattr(cause, "cause", None) or cause  # a RayTaskError carries the worker's exception as .cause
        others = f" (and {len(failures) - 1} more failed worker(s))" if len(failures) > 1 else ""
        return _cli.one_line(f"rank {rank}: {type(cause).__name__}: {cause}{others}")[:2000]
    cause = getattr(err, "controller_failure", None) or err
    return _cli.one_line(f"{type(cause).__name__}: {cause}")[:2000]


def _path_value(cfg: Any, dotted: str) -> str:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


if __name__ == "__main__":
    sys.exit(main())
