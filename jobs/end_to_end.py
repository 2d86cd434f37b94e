"""From raw footage to a trained text-to-video checkpoint, with lineage, in one job.

    python -m jobs.end_to_end                      # built-in sample, tiny presets and stand-ins, minutes on a CPU
    python -m jobs.end_to_end --input /data/raw --output /data/run --config jobs/configs/end_to_end.toml
    ray job submit --working-dir . -- python -m jobs.end_to_end --input /abs/raw --output /abs/run

Steps (each one of the project's own jobs, run in this process on one Ray; ``STEPS``):

    curate -> catalog -> shards -> vae_stage1 -> vae_stage2 -> precompute -> dit -> dit_hq -> sample -> export -> report

The config has one table per step, each the same as that step's own job config (``[shards]`` is a
jobs/configs/shards.toml plus ``where``; ``[vae_stage1]`` a stage TOML; ``[dit_hq]`` a stage TOML with
``[selection]``, as jobs/configs/dit_hq.toml; ...). The paths that join the steps (shard roots, the VAE
checkpoint, ``init_from``, run folders) are set here, under ``--output``. A stage whose ``[data] buckets``
is empty gets them from the shards the run made: VAE stage 1 the shortest video bucket and the images,
VAE stage 2 the longest video bucket the data fills (said plainly when that is short of CogVideoX's 161
frames), the DiT stages every bucket.

Each step prints one line when it ends and the job a table at the end. A step's record
(``OUT/_steps/<step>.json``: a hash of its config and of every step before it, its outputs) lets a re-run
skip every complete step; a killed run resumes in the step it was in (training steps from their latest
checkpoint); a changed config reruns that step and the ones after it.
Exit status: 0 done, 1 a step failed, 2 bad arguments or config (one line on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.config import ConfigError, load_toml
from jobs import _cli

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "end_to_end.toml"
STEPS = ("curate", "catalog", "shards", "vae_stage1", "vae_stage2", "precompute", "dit", "dit_hq", "sample",
         "export", "report")
TRAIN_STEPS = ("vae_stage1", "vae_stage2", "dit", "dit_hq")
CogVideoX_VAE_STAGE2_FRAMES = 161


# ---------------------------------------------------------------------------------------------------------
# TOML out (the per-step configs the jobs read): tables of scalars, lists and nested tables.


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"TOML: expected a string, number, bool or list, got {type(v).__name__} {v!r}")


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            out += f"\n[{name}]\n" + dump_toml(v, name)
    return out


# ---------------------------------------------------------------------------------------------------------
# Steps


@dataclass
class Context:
    out: Path
    input: str
    config: dict[str, Any]
    address: str
    notes: dict[str, list[str]] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    @property
    def catalog(self) -> Path:
        return self.path("curate", "catalog.duckdb")

    def section(self, name: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.config.get(name, {})))  # a deep copy

    def write_config(self, name: str, data: dict[str, Any]) -> Path:
        path = self.path("configs", f"{name}.toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# written by jobs.end_to_end from the [{name}] table of its config\n" + dump_toml(data))
        return path

    def note(self, step: str, text: str) -> None:
        print(f"[end_to_end] {step}: {text}", flush=True)
        self.notes.setdefault(step, []).append(text)


def _call(job: Callable[[list[str]], int], argv: list[str], step: str) -> None:
    rc = job(argv)
    if rc != 0:
        raise StepFailed(f"step {step}: the job exited with status {rc} (argv {argv})")


class StepFailed(RuntimeError):
    pass


def step_curate(ctx: Context) -> list[Path]:
    from jobs.curate import main as curate

    argv = ["--output", str(ctx.path("curate")), "--config", str(ctx.write_config("curate", ctx.section("curate")))]
    if ctx.input:
        argv += ["--input", ctx.input]
    _call(curate, argv, "curate")
    return [ctx.path("curate", n) for n in ("videos.parquet", "clips.parquet", "runs.parquet")]


def step_catalog(ctx: Context) -> list[Path]:
    from catalog.db import open_catalog, register_run, set_threshold

    register_run(ctx.catalog, ctx.path("curate"))  # jobs.curate registered it: a no-op unless it changed
    sec = ctx.section("catalog")
    con = open_catalog(ctx.catalog)
    try:
        for name, value in sec.get("thresholds", {}).items():
            set_threshold(con, name, value)
        kept, total = con.execute("SELECT (SELECT count(*) FROM kept_clips), (SELECT count(*) FROM clips)").fetchone()
    finally:
        con.close()
    ctx.note("catalog", f"{kept} of {total} clips kept in {ctx.catalog}")
    if kept == 0:
        raise StepFailed(f"step catalog: no kept clips in {ctx.catalog}; nothing to train on")
    return [ctx.catalog]


def step_shards(ctx: Context) -> list[Path]:
    from jobs.shards import main as shards

    sec = ctx.section("shards")
    where = sec.pop("where", "true")
    _call(shards, ["--catalog", str(ctx.catalog), "--where", where, "--output", str(ctx.path("shards")),
                   "--config", str(ctx.write_config("shards", sec)), "--overwrite"], "shards")
    return [ctx.path("shards", "manifest.json")]


def _manifest_buckets(root: Path) -> dict[str, int]:
    from catalog.shards import read_manifest

    manifest = read_manifest(root)
    if manifest is None:
        raise StepFailed(f"{root}: expected a shard folder with manifest.json")
    return {name: b["samples"] for name, b in manifest["buckets"].items() if b["samples"] > 0}


def _frames(bucket: str) -> int:
    return int(bucket.split("x")[0])


def _auto_data(data: dict[str, Any], buckets: dict[str, int], batch: dict[str, int]) -> dict[str, Any]:
    names = sorted(buckets, key=lambda b: (-_frames(b), b))
    data["buckets"] = names
    data["weights"] = [float(buckets[b]) for b in names]
    data["batch_sizes"] = [batch["image"] if _frames(b) == 1 else batch["video"] for b in names]
    return data


def _video_buckets(buckets: dict[str, int]) -> list[str]:
    return sorted((b for b in buckets if _frames(b) > 1), key=lambda b: (_frames(b), -buckets[b], b))


def _train(ctx: Context, name: str, data: dict[str, Any]) -> None:
    from jobs.train import main as train

    data.setdefault("ray", {}).update({"storage_path": str(ctx.path("runs")), "name": name})
    _call(train, ["--config", str(ctx.write_config(name, data))], name)


def _batch(sec: dict[str, Any]) -> dict[str, int]:
    return {"video": int(sec.get("data", {}).pop("video_batch_size", 2)),
            "image": int(sec.get("data", {}).pop("image_batch_size", 4))}


def step_vae_stage1(ctx: Context) -> list[Path]:
    sec = ctx.section("vae_stage1")
    batch = _batch(sec)
    data = sec.setdefault("data", {})
    data["root"] = str(ctx.path("shards"))
    if not data.get("buckets"):
        have = _manifest_buckets(ctx.path("shards"))
        videos = _video_buckets(have)
        if not videos:
            raise StepFailed("step vae_stage1: the shards hold no video bucket to train the VAE on")
        chosen = {videos[0]: have[videos[0]]} | {b: n for b, n in have.items() if _frames(b) == 1}
        _auto_data(data, chosen, batch)
        ctx.note("vae_stage1", f"buckets {data['buckets']} (the shortest video bucket and the images)")
    _train(ctx, "vae_stage1", sec)
    _register(ctx, "vae_stage1", ctx.path("shards"), ctx.path("configs", "vae_stage1.toml"))
    return [ctx.path("runs", "vae_stage1")]


def step_vae_stage2(ctx: Context) -> list[Path]:
    import torch

    from catalog.shards import parse_bucket
    from trainer.checkpoint import latest_checkpoint
    from trainer.data import DataConfig, heldout_clips, measure_latent_scale, save_latent_scale
    from trainer.sampling import load_vae

    sec = ctx.section("vae_stage2")
    batch = _batch(sec)
    data = sec.setdefault("data", {})
    data["root"] = str(ctx.path("shards"))
    sec.setdefault("train", {})["init_from"] = str(ctx.path("runs", "vae_stage1"))
    have = _manifest_buckets(ctx.path("shards"))
    if not data.get("buckets"):
        longest = _video_buckets(have)[-1]
        longest = max((b for b in have if _frames(b) == _frames(longest)), key=lambda b: (have[b], b))
        _auto_data(data, {longest: have[longest]}, batch)
        f = _frames(longest)
        if f < CogVideoX_VAE_STAGE2_FRAMES:
            ctx.note("vae_stage2", f"CogVideoX fine-tunes the VAE on {CogVideoX_VAE_STAGE2_FRAMES} frames; the longest "
                                   f"bucket this data fills is {longest} ({have[longest]} samples), so stage 2 "
                                   f"trains on {f} frames")
        else:
            ctx.note("vae_stage2", f"bucket {longest} ({have[longest]} samples)")
    _train(ctx, "vae_stage2", sec)
    _register(ctx, "vae_stage2", ctx.path("shards"), ctx.path("configs", "vae_stage2.toml"))
    # The DiT's latent scale: 1/std of posterior samples of this VAE, stored with its checkpoint.
    ckpt = latest_checkpoint(ctx.path("runs", "vae_stage2"))
    video = [b for b in data["buckets"] if parse_bucket(b)[0] > 1][0]
    clips = heldout_clips(DataConfig(heldout_root=data["root"], heldout_bucket=video, heldout_samples=8),
                          rank=0, world_size=1)
    vae, _ = load_vae(ckpt)
    with torch.no_grad():
        measured = measure_latent_scale(vae, [c[None] for c in clips])
    save_latent_scale(ckpt, measured)
    ctx.note("vae_stage2", f"latent scale {measured['latent_scale']:.4f} (1/std over {int(measured['clips'])} clips) "
                           f"stored in {ckpt}")
    return [ckpt / "latent_scale.json"]


def _text_model(ctx: Context, sec: dict[str, Any]) -> None:
    """The stand-in T5 lives in the run folder unless the config names a real encoder."""
    if sec.get("standins", {}).get("text"):
        sec.setdefault("text", {})["model"] = str(ctx.path("standins", "t5"))


def step_precompute(ctx: Context) -> list[Path]:
    from jobs.precompute import main as precompute

    sec = ctx.section("precompute")
    sec.setdefault("data", {}).update({"shards": str(ctx.path("shards")), "output": str(ctx.path("latents"))})
    sec.setdefault("vae", {})["checkpoint"] = str(ctx.path("runs", "vae_stage2"))
    _text_model(ctx, sec)
    _call(precompute, ["--config", str(ctx.write_config("precompute", sec)), "--overwrite"], "precompute")
    return [ctx.path("latents", "manifest.json")]


def _register(ctx: Context, name: str, shards: Path, sec_path: Path, selection: Any = None) -> int:
    from catalog.db import register_checkpoint
    from jobs.train import load_stage
    from trainer.checkpoint import latest_checkpoint

    cfg = load_stage(sec_path)
    ckpt = latest_checkpoint(ctx.path("runs", name))
    metrics = _last_metrics(ckpt)
    rec = register_checkpoint(ctx.catalog, checkpoint=ckpt, run=name, stage=name, kind=cfg.stage.kind,
                              step=int(metrics.get("step", 0)), config=dataclasses.asdict(cfg), shards_output=shards,
                              buckets=cfg.data.buckets, init_from=cfg.train.init_from or None, metrics=metrics)
    return rec.distinct_clips


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics reported with each checkpoint of a Ray Train run (its checkpoint_manager_snapshot.json)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    try:
        results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except json.JSONDecodeError:
        return []  # being rewritten by a running trainer: no complete record to read yet
    return sorted((r["metrics"] for r in results if "step" in r.get("metrics", {})), key=lambda m: m["step"])


def _last_metrics(ckpt: Path) -> dict[str, Any]:
    from trainer.checkpoint import checkpoint_step

    step = checkpoint_step(ckpt)
    return next((m for m in run_metrics(ckpt.parent) if m["step"] == step), {"step": step})


def loss_svg(curves: dict[str, list[tuple[int, float]]], width: int = 640, height: int = 240) -> str:
    """Loss against step, one polyline per run, steps of later runs continuing the earlier ones'."""
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    points = [(x, y) for c in curves.values() for x, y in c]
    if not points:
        return "<p>no metrics recorded</p>"
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    sx = lambda x: 40 + (x - x0) / max(x1 - x0, 1) * (width - 60)  # noqa: E731
    sy = lambda y: height - 30 - (y - y0) / max(y1 - y0, 1e-12) * (height - 50)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="loss">',
             f'<text x="4" y="14" font-size="12">loss {y1:.3g}</text>',
             f'<text x="4" y="{height - 34}" font-size="12">{y0:.3g}</text>',
             f'<text x="{width - 90}" y="{height - 8}" font-size="12">step {x1}</text>']
    for i, (name, c) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in c)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in c]
        parts.append(f'<text x="{50 + 110 * i}" y="{height - 8}" font-size="12" fill="{colour}">{name}</text>')
    return "".join(parts) + "</svg>"


def _dit_section(ctx: Context, name: str, root: Path) -> dict[str, Any]:
    sec = ctx.section(name)
    batch = _batch(sec)
    data = sec.setdefault("data", {})
    data["root"] = str(root)
    sec.setdefault("vae", {})["checkpoint"] = str(ctx.path("runs", "vae_stage2"))
    _text_model(ctx, sec)
    return sec | {"_batch": batch}


def step_dit(ctx: Context) -> list[Path]:
    sec = _dit_section(ctx, "dit", ctx.path("latents"))
    batch = sec.pop("_batch")
    if not sec["data"].get("buckets"):
        _auto_data(sec["data"], _manifest_buckets(ctx.path("latents")), batch)
        ctx.note("dit", f"buckets {sec['data']['buckets']} from the precomputed latents")
    _train(ctx, "dit", sec)
    n = _register(ctx, "dit", ctx.path("latents"), ctx.path("configs", "dit.toml"))
    ctx.note("dit", f"lineage: {n} clips recorded for its checkpoint in {ctx.catalog}")
    return [ctx.path("runs", "dit")]


def step_dit_hq(ctx: Context) -> list[Path]:
    from jobs.selection import LINEAGE_FILE
    from trainer.checkpoint import latest_checkpoint

    sec = _dit_section(ctx, "dit_hq", ctx.path("shards_hq"))
    batch = sec.pop("_batch")
    sel = sec.setdefault("selection", {})
    sel.update({"catalog": str(ctx.catalog), "output": str(ctx.path("shards_hq")),
                "shards_config": str(ctx.path("configs", "shards.toml"))})
    sec.setdefault("train", {})["init_from"] = str(ctx.path("runs", "dit"))
    if not sec["data"].get("buckets"):
        # The buckets come from the selection's shards, which jobs.train builds: build them first (reused there).
        from jobs.selection import SelectionConfig, build

        built = build(SelectionConfig(**sel), ctx.address)
        _auto_data(sec["data"], _manifest_buckets(built.root), batch)
        ctx.note("dit_hq", f"{built.rows} clips match {sel['where']!r}; buckets {sec['data']['buckets']}")
    _train(ctx, "dit_hq", sec)
    ckpt = latest_checkpoint(ctx.path("runs", "dit_hq"))
    if ckpt is None or not (ckpt / LINEAGE_FILE).is_file():
        raise StepFailed(f"step dit_hq: expected {LINEAGE_FILE} in the final checkpoint {ckpt}")
    return [ckpt / LINEAGE_FILE]


def step_sample(ctx: Context) -> list[Path]:
    from jobs.sample import main as sample

    sec = ctx.section("sample")
    argv = ["--checkpoint", str(ctx.path("runs", "dit_hq")), "--output", str(ctx.path("samples"))]
    for p in sec.pop("prompts", ["a red car drives through snow"]):
        argv += ["--prompt", p]
    for key, flag in (("frames", "--frames"), ("height", "--height"), ("width", "--width"), ("steps", "--steps"),
                      ("guidance_scale", "--guidance"), ("seed", "--seed")):
        if key in sec:
            argv += [flag, str(sec.pop(key))]
    if sec:
        raise ConfigError(f"[sample] unknown key(s) {sorted(sec)}; expected prompts, frames, height, width, steps, "
                          "guidance_scale, seed")
    shutil.rmtree(ctx.path("samples"), ignore_errors=True)
    _call(sample, argv, "sample")
    return sorted(ctx.path("samples").glob("*.mp4")) + sorted(ctx.path("samples").glob("*.png"))


def step_export(ctx: Context) -> list[Path]:
    from jobs.export import main as export

    target = ctx.path("export", "diffusers")
    shutil.rmtree(target, ignore_errors=True)  # a killed export's leftovers (a complete one was skipped)
    _call(export, ["--checkpoint", str(ctx.path("runs", "dit_hq")), "--to", "diffusers", "--output", str(target)],
          "export")
    return [target / "transformer" / "config.json"]


def step_report(ctx: Context) -> list[Path]:
    from catalog.cli import main as catalog_cli

    report = ctx.path("report.html")
    rc = catalog_cli(["report", str(ctx.catalog), "--output", str(report)])
    if rc != 0:
        raise StepFailed(f"step report: python -m catalog report exited with {rc}")
    training = write_training_report(ctx)
    return [report, training]


def write_training_report(ctx: Context) -> Path:
    """OUT/training.html: per training stage its checkpoint, step and lineage counts; the sample sheet."""
    import base64
    import html

    from catalog.db import open_catalog

    con = open_catalog(ctx.catalog, read_only=True)
    try:
        rows = con.execute(
            "SELECT k.run, k.step, k.selection, k.selection_rows, count(DISTINCT c.clip_id), "
            "count(DISTINCT c.video_id), k.checkpoint FROM checkpoints k "
            "LEFT JOIN checkpoint_clips c USING (checkpoint) WHERE k.checkpoint LIKE ? "
            "GROUP BY ALL ORDER BY min(k.registered_at)", [f"{ctx.out}%"]).fetchall()
    finally:
        con.close()
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    sheets = "".join(
        f'<figure><img alt="sample sheet" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.name)}</figcaption></figure>" for p in sorted(ctx.path("samples").glob("*.png")))
    curves, offset = {}, 0
    for name in TRAIN_STEPS:
        ms = run_metrics(ctx.path("runs", name))
        curves[name] = [(offset + int(m["step"]), float(m["loss"])) for m in ms if "loss" in m]
        offset += int(ms[-1]["step"]) if ms else 0
    vae = {k: v for k, v in curves.items() if k.startswith("vae")}
    dit = {k: v for k, v in curves.items() if k.startswith("dit")}
    notes = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(t)}</li>" for k, v in ctx.notes.items() for t in v)
    page = (f"<!doctype html><meta charset=utf-8><title>training: {html.escape(str(ctx.out))}</title>"
            "<h1>Training</h1><table border=1><tr><th>run</th><th>step</th><th>selection</th><th>selected</th>"
            f"<th>clips trained</th><th>videos</th><th>checkpoint</th></tr>{cells}</table>"
            f"<h2>Loss</h2><h3>VAE (reconstruction)</h3>{loss_svg(vae)}<h3>DiT (diffusion)</h3>{loss_svg(dit)}"
            f"<h2>Notes</h2><ul>{notes}</ul><h2>Samples</h2>{sheets}")
    path = ctx.path("training.html")
    path.write_text(page)
    return path


RUNNERS: dict[str, Callable[[Context], list[Path]]] = {
    "curate": step_curate, "catalog": step_catalog, "shards": step_shards, "vae_stage1": step_vae_stage1,
    "vae_stage2": step_vae_stage2, "precompute": step_precompute, "dit": step_dit, "dit_hq": step_dit_hq,
    "sample": step_sample, "export": step_export, "report": step_report,
}


# ---------------------------------------------------------------------------------------------------------
# Records: skip complete steps


def step_hashes(config: dict[str, Any], input_: str) -> dict[str, str]:
    """Each step's hash covers its own table and every earlier step's (a change reruns it and what follows)."""
    hashes, prev = {}, hashlib.sha256(f"input:{input_}".encode()).hexdigest()
    for name in STEPS:
        table = json.dumps(config.get(name, {}), sort_keys=True)
        prev = hashlib.sha256(f"{prev}:{name}:{table}".encode()).hexdigest()[:16]
        hashes[name] = prev
    return hashes


def _record_path(out: Path, step: str) -> Path:
    return out / "_steps" / f"{step}.json"


def read_record(out: Path, step: str) -> dict[str, Any] | None:
    path = _record_path(out, step)
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(out: Path, step: str, record: dict[str, Any]) -> None:
    path = _record_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def is_complete(record: dict[str, Any] | None, want: str) -> bool:
    return (record is not None and record.get("status") == "done" and record.get("hash") == want
            and all(Path(p).exists() for p in record.get("outputs", [])))


def _stale_outputs(ctx: Context, step: str) -> None:
    """A training step whose config changed starts a fresh run (its folder would otherwise resume)."""
    if step in TRAIN_STEPS:
        shutil.rmtree(ctx.path("runs", step), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> _cli.ArgumentParser:
    ap = _cli.ArgumentParser(prog="python -m jobs.end_to_end", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="", help="raw videos/images (default: the built-in generated sample)")
    ap.add_argument("--output", default="out/end_to_end", help="run folder (default out/end_to_end)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML with one table per step (STEPS)")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an in-process cluster)")
    return ap


def load_config(path: str) -> dict[str, Any]:
    data = load_toml(path)
    unknown = sorted(set(data) - set(STEPS))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; expected one per step of {list(STEPS)}")
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise ConfigError(f"{path}: {bad} must be tables ([name]), one per step")
    return data


@_cli.entry
def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = _parser().parse_args(argv)
    config = _cli.load_config(load_config, args.config)
    _cli.refuse_relative_paths({"--input": args.input, "--output": args.output})
    out = Path(args.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    address = _cli.ray_address(args.address)
    ctx = Context(out, str(Path(args.input).resolve()) if args.input else "", config, address)
    print(f"[end_to_end] {out}: {' -> '.join(STEPS)}" + ("" if args.input else
          " (no --input: the built-in sample, tiny presets and tiny random stand-in models, named as such)"), flush=True)
    hashes = step_hashes(config, ctx.input)
    from jobs.train import _show_worker_line

    session = _cli.start_ray(address, out, show=_show_worker_line)  # the training steps' metric lines
    print(session.describe(), flush=True)
    table: list[tuple[str, str, str, str]] = []
    failed = None
    try:
        for i, step in enumerate(STEPS, 1):
            record = read_record(out, step)
            if is_complete(record, hashes[step]):
                ctx.notes.update({step: record.get("notes", [])})
                table.append((step, "skipped", f"{record['seconds']:.1f}s earlier", _outputs(out, record["outputs"])))
                print(f"[end_to_end] {i}/{len(STEPS)} {step}: complete from an earlier run, skipped", flush=True)
                continue
            if record is not None and record.get("hash") != hashes[step]:
                _stale_outputs(ctx, step)
            write_record(out, step, {"status": "running", "hash": hashes[step], "started": time.time()})
            print(f"[end_to_end] {i}/{len(STEPS)} {step}: running", flush=True)
            s0 = time.time()
            try:
                outputs = RUNNERS[step](ctx)
            except StepFailed as err:
                failed = str(err)
                table.append((step, "FAILED", f"{time.time() - s0:.1f}s", ""))
                break
            seconds = time.time() - s0
            write_record(out, step, {"status": "done", "hash": hashes[step], "seconds": seconds,
                                     "outputs": [str(p) for p in outputs], "notes": ctx.notes.get(step, [])})
            table.append((step, "done", f"{seconds:.1f}s", _outputs(out, outputs)))
            print(f"[end_to_end] {i}/{len(STEPS)} {step}: done in {seconds:.1f}s -> {_outputs(out, outputs)}",
                  flush=True)
    finally:
        session.close()
    width = max(len(s) for s, *_ in table)
    print(f"end_to_end {'FAILED' if failed else 'done'}: {out} ({time.time() - t0:.1f}s)")
    print(f"  {'step'.ljust(width)}  status   {'time'.ljust(14)}  outputs")
    for step, status, seconds, outputs in table:
        print(f"  {step.ljust(width)}  {status.ljust(7)}  {seconds.ljust(14)}  {outputs}")
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


def _outputs(out: Path, paths: list) -> str:
    rel = [str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p) for p in paths]
    return ", ".join(rel[:3]) + (f" (+{len(rel) - 3})" if len(rel) > 3 else "")


if __name__ == "__main__":
    sys.exit(main())
