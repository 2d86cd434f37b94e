"""`ray job submit -- python -m jobs.end_to_end` with no arguments to a real head, end to end on the built-in sample
(slow: a few minutes); then again in-process, where every step is skipped and no output is rewritten, and killed
in the DiT stage and resumed."""
from __future__ import annotations

from procs import descendants

import json
import tomllib
from pathlib import Path

import pytest

from catalog.db import open_catalog
from catalog.shards import read_manifest
from jobs.end_to_end import DEFAULT_CONFIG, STEPS, TRAIN_STEPS, run_metrics
from jobs.end_to_end import main as end_to_end
from trainer.checkpoint import checkpoint_step, latest_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(ray_head, tmp_path_factory) -> tuple[Path, str]:
    """The no-argument job (built-in sample, shipped end_to_end.toml), sent with `ray job submit` to the session's
    real head: one run is both the end-to-end test and the submit test (every step in the submitted driver on the
    head's cluster). The in-process path runs in the kill-and-resume test below."""
    out = tmp_path_factory.mktemp("end_to_end") / "run"
    sub = ray_head.submit("python", "-m", "jobs.end_to_end", "--output", str(out), timeout=1800)
    console = sub.stdout + sub.stderr
    assert sub.returncode == 0, console[-6000:]
    assert "ray: connected to" in console and "in-process cluster" not in console  # it joined the head
    return out, console


def _query(db: Path, sql: str) -> list[tuple]:
    con = open_catalog(db, read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_every_step_ran_and_the_closing_table_lists_them(run) -> None:
    out, console = run
    for i, step in enumerate(STEPS, 1):
        assert f"[end_to_end] {i}/{len(STEPS)} {step}: done in" in console
    table = console[console.index("end_to_end done:"):]
    assert all(f"  {step}" in table for step in STEPS)
    assert "stand-in" in console  # the tiny stand-ins are named as such
    # Each worker metric line reaches the console once (Ray Train's print patch used to print every one twice).
    metric_lines = [line for line in console.splitlines() if line.startswith("step ")]
    assert metric_lines and len(metric_lines) == len(set(metric_lines))


def test_tables_catalog_shards_and_a_vae_checkpoint_per_stage(run) -> None:
    out, console = run
    for name in ("videos", "clips", "rejects", "runs"):
        assert (out / "curate" / f"{name}.parquet").exists()
    db = out / "curate" / "catalog.duckdb"
    kept = _query(db, "SELECT count(*) FROM kept_clips")[0][0]
    shards = read_manifest(out / "shards")
    assert kept >= 4 and shards["samples"] == kept
    cfg = tomllib.loads(DEFAULT_CONFIG.read_text())
    for stage in ("vae_stage1", "vae_stage2"):
        ckpt = latest_checkpoint(out / "runs" / stage)
        assert ckpt is not None and checkpoint_step(ckpt) == cfg[stage]["train"]["steps"]
    assert (latest_checkpoint(out / "runs" / "vae_stage2") / "latent_scale.json").is_file()
    assert "the longest bucket this data fills is 17x48x80" in console  # stage 2 says what it trained on


def test_precomputed_latents_and_a_dit_checkpoint_per_stage(run) -> None:
    out, _ = run
    latents, shards = read_manifest(out / "latents"), read_manifest(out / "shards")
    assert latents["source"] == "precompute" and latents["samples"] == shards["samples"]
    assert sorted(latents["buckets"]) == sorted(shards["buckets"])
    cfg = tomllib.loads(DEFAULT_CONFIG.read_text())
    for stage in ("dit", "dit_hq"):
        ckpt = latest_checkpoint(out / "runs" / stage)
        assert ckpt is not None and checkpoint_step(ckpt) == cfg[stage]["train"]["steps"]


def test_the_hq_checkpoint_trained_on_exactly_the_predicates_rows(run) -> None:
    out, _ = run
    db = out / "curate" / "catalog.duckdb"
    where = tomllib.loads(DEFAULT_CONFIG.read_text())["dit_hq"]["selection"]["where"]
    ckpt = latest_checkpoint(out / "runs" / "dit_hq")
    want = [r[0] for r in _query(db, f"SELECT clip_id FROM kept_clips WHERE {where} ORDER BY 1")]
    got = [r[0] for r in _query(db, f"SELECT DISTINCT clip_id FROM checkpoint_clips WHERE checkpoint = '{ckpt}' "
                                    "ORDER BY 1")]
    all_kept = _query(db, "SELECT count(*) FROM kept_clips")[0][0]
    assert got == want and 0 < len(want) < all_kept
    lineage = json.loads((ckpt / "lineage.json").read_text())["selection"]
    assert lineage["where"] == where and lineage["rows"] == len(want)
    row = _query(db, f"SELECT selection, selection_rows, selection_sha256, init_from FROM checkpoints "
                     f"WHERE checkpoint = '{ckpt}'")[0]
    assert row[:3] == (where, len(want), lineage["clip_ids_sha256"]) and row[3] == str(out / "runs" / "dit")
    # Every training stage's checkpoint has its lineage rows (which clips trained it).
    runs = _query(db, "SELECT run, count(DISTINCT clip_id) FROM checkpoints JOIN checkpoint_clips USING (checkpoint) "
                      "GROUP BY ALL ORDER BY 1")
    assert [r[0] for r in runs] == sorted(TRAIN_STEPS) and all(n > 0 for _, n in runs)


def test_samples_export_and_report(run) -> None:
    out, _ = run
    import torch
    from diffusers import CogVideoXTransformer3DModel

    assert list((out / "samples").glob("*.mp4")) and list((out / "samples").glob("*.png"))
    model = CogVideoXTransformer3DModel.from_pretrained(out / "export" / "diffusers" / "transformer")
    assert sum(p.numel() for p in model.parameters()) > 0 and isinstance(model, torch.nn.Module)
    assert (out / "report.html").stat().st_size > 1000
    training = (out / "training.html").read_text()
    assert "dit_hq" in training and "data:image/png;base64," in training


def test_the_training_page_shows_its_loss_curves_and_sample_sheet_in_headless_chromium(run, tmp_path) -> None:
    """RUN/training.html as a browser shows it: nothing fails to load, each loss curve's points are drawn where the
    page puts them (both stages of each plot in their colours), and the sample sheet on screen is the PNG the
    sampler wrote."""
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    from chromium import crop, render, share_near

    out, _ = run
    page = out / "training.html"
    shown = render(page, tmp_path / "chromium")
    assert shown.failed == [] and shown.imgs and all(i["decoded"] for i in shown.imgs), (shown.failed, shown.imgs)
    assert shown.pixels.std() > 20, "screenshot is blank"

    markup = page.read_text()
    curves = [s for s in shown.svgs if s["cls"] == "loss"]
    svgs = re.findall(r'<svg[^>]*class="loss".*?</svg>', markup, re.DOTALL)
    assert len(curves) == len(svgs) == 2  # VAE and DiT
    rgb = lambda c: tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))  # noqa: E731
    for box, svg in zip(curves, svgs):
        left, top = box["box"][:2]
        points = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="3" fill="(#[0-9a-f]{6})"', svg)
        assert len({c for *_, c in points}) == 2, svg[:300]  # two stages per plot, two colours
        for cx, cy, colour in points:
            pixel = shown.pixels[int(top + float(cy)), int(left + float(cx))]
            assert np.abs(pixel - np.array(rgb(colour))).max() <= 60, (cx, cy, colour, pixel)
        region = crop(shown.pixels, box["box"])
        assert all(share_near(region, rgb(c)) > 1e-3 for c in {c for *_, c in points})

    sheets = re.findall(r'<img alt="sample sheet" src="data:image/png;base64,([^"]+)"', markup)
    assert len(sheets) == len(shown.imgs) >= 1
    for data, img in zip(sheets, shown.imgs):
        want = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        got = crop(shown.pixels, img["box"])
        want = np.asarray(want.resize((got.shape[1], got.shape[0]))).astype(np.int16)
        assert got.std() > 10 and np.abs(got - want).mean() < 12, "the sample sheet on screen is not the PNG"


def test_a_rerun_skips_every_step_and_rewrites_nothing(run, capsys) -> None:
    out, _ = run
    watched = [p for p in out.rglob("*") if p.is_file() and "_steps" not in p.parts and p.name != "ray.log"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert end_to_end(["--output", str(out)]) == 0
    console = capsys.readouterr().out
    assert all(f"{step}: complete from an earlier run, skipped" in console for step in STEPS)
    changed = [str(p) for p in watched if p.stat().st_mtime_ns != before[p]]
    assert changed == []


def _hq_clips(db: Path, out: Path) -> list[str]:
    ckpt = latest_checkpoint(out / "runs" / "dit_hq")
    return [r[0] for r in _query(db, f"SELECT clip_id FROM checkpoint_clips WHERE checkpoint = '{ckpt}' ORDER BY 1")]


def test_killed_in_the_dit_stage_it_resumes_from_that_stages_checkpoint(run, capsys) -> None:
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    out, _ = run
    db = out / "curate" / "catalog.duckdb"
    final = {s: checkpoint_step(latest_checkpoint(out / "runs" / s)) for s in ("dit", "dit_hq")}
    hq_clips = _hq_clips(db, out)
    # Back to the state before the DiT stage: its record and those after it, and their outputs, gone.
    for step in STEPS[STEPS.index("dit"):]:
        (out / "_steps" / f"{step}.json").unlink()
    for folder in ("runs/dit", "runs/dit_hq", "samples", "export"):
        shutil.rmtree(out / folder)
    earlier = {p: p.stat().st_mtime_ns for d in ("curate", "shards", "latents", "runs/vae_stage1", "runs/vae_stage2")
               for p in (out / d).rglob("*") if p.is_file() and p.name != "ray.log"
               and not p.name.startswith("catalog.duckdb")}  # the DiT stages record their lineage in the catalog

    log = (out.parent / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.end_to_end", "--output", str(out)], cwd=Path(__file__).parents[2],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill it once Ray Train has recorded the DiT stage's first checkpoint as complete (an event, not a delay).
        while not run_metrics(out / "runs" / "dit"):
            assert proc.poll() is None, (out.parent / "killed.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        pids = descendants(proc.pid) | {proc.pid}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        log.close()
    killed_at = checkpoint_step(latest_checkpoint(out / "runs" / "dit"))
    assert killed_at < final["dit"] and not (out / "_steps" / "dit_hq.json").exists()

    assert end_to_end(["--output", str(out)]) == 0
    console = capsys.readouterr().out
    assert all(f"{step}: complete from an earlier run, skipped" in console for step in STEPS[:STEPS.index("dit")])
    assert f"resuming dit from {out / 'runs' / 'dit'}" in console
    assert [str(p) for p, t in earlier.items() if p.stat().st_mtime_ns != t] == []
    assert {s: checkpoint_step(latest_checkpoint(out / "runs" / s)) for s in ("dit", "dit_hq")} == final
    assert _hq_clips(db, out) == hq_clips
