"""Wall time of ``python -m jobs.end_to_end`` with no arguments, step by step, and what precomputing buys.

    python bench/end_to_end.py [--output DIR] [--keep]

1. Runs the no-argument job (built-in sample, tiny presets and stand-ins) in a fresh folder and prints each
   step's wall time (``step_seconds.<step>=X``, from the job's step records) and ``total_seconds=X``.
2. On the run's own data, the trainer's input side per clip: the DiT loader reading the precomputed shards
   (moments + T5 states: a posterior sample and nothing else) against the same loader on the pixel shards with
   the VAE and T5 encoding inside the trainer, as a training step without precompute does
   (``precompute_speedup=X`` = on-the-fly seconds per clip / precomputed seconds per clip), and the precompute
   job's own rate (``precompute_job_clips_per_s``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _input_seconds_per_clip(root: Path, vae_run: Path, text_model: Path, max_length: int, steps: int) -> float:
    import torch

    from catalog.shards import read_manifest
    from trainer.data import DiTBatches, DiTDataConfig, batch_latents, batch_text, posterior_generator
    from trainer.sampling import load_vae
    from trainer.text import TextConfig, TextEncoder

    torch.set_num_threads(1)
    buckets = sorted(read_manifest(root)["buckets"])
    cfg = DiTDataConfig(root=str(root), buckets=tuple(buckets), weights=(1.0,) * len(buckets),
                        batch_sizes=(2,) * len(buckets), num_workers=0)
    vae, _ = load_vae(vae_run)
    encoder = TextEncoder(TextConfig(model=str(text_model), max_length=max_length), "cpu")
    clips, t0 = 0, time.perf_counter()
    for batch in itertools.islice(DiTBatches(cfg, seed=0), steps):
        batch_latents(batch, scale=1.0, vae=vae, generator=posterior_generator(0, batch["step"], 0))
        batch_text(batch, encoder=encoder)
        clips += len(batch["captions"])
    return (time.perf_counter() - t0) / clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", help="run folder (default: a fresh temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    ap.add_argument("--loader-steps", type=int, default=12, help="loader steps timed per kind of shard")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_")) if not args.output else None
    out = Path(args.output).resolve() if args.output else tmp / "run"
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jobs.end_to_end", "--output", str(out)], cwd=REPO)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"jobs.end_to_end exited with {proc.returncode}")
        for record in sorted((out / "_steps").glob("*.json"), key=lambda p: p.stat().st_mtime):
            print(f"step_seconds.{record.stem}={json.loads(record.read_text())['seconds']:.1f}")
        print(f"total_seconds={total:.1f}")

        import tomllib

        cfg = tomllib.loads((out / "configs" / "precompute.toml").read_text())
        vae_run, t5 = out / "runs" / "vae_stage2", Path(cfg["text"]["model"])
        fly = _input_seconds_per_clip(out / "shards", vae_run, t5, cfg["text"]["max_length"], args.loader_steps)
        pre = _input_seconds_per_clip(out / "latents", vae_run, t5, cfg["text"]["max_length"], args.loader_steps)
        latents = json.loads((out / "latents" / "manifest.json").read_text())
        seconds = json.loads((out / "_steps" / "precompute.json").read_text())["seconds"]
        print(f"trainer_input_seconds_per_clip_on_the_fly={fly:.4f}")
        print(f"trainer_input_seconds_per_clip_precomputed={pre:.4f}")
        print(f"precompute_job_clips_per_s={latents['samples'] / seconds:.2f} (whole step, actor start included)")
        print(f"precompute_speedup={fly / pre:.2f}")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
