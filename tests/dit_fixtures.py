"""What every DiT test trains on, built once per session: a tiny trained VAE (with its measured latent
scale), a tiny stand-in T5 and bucketed shards (synthetic, and the built-in sample's at small buckets).

Builders are idempotent on a folder (a ``done`` marker), so the trainer and jobs test folders, which
each register their own fixture, share one build under the session's base temp folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VIDEO, IMAGE = "9x32x32", "1x32x32"
"""Synthetic buckets of the fast tests: 9 frames -> 3 latent frames of 4x4 (12 vision tokens)."""
SAMPLE_RESOLUTIONS = ("48x80", "64x64", "80x48")
"""Small buckets for the built-in sample's shards (its videos are 320x192, so 48x80 keeps the aspect)."""
VAE_STEPS = 30


def _done(folder: Path) -> bool:
    return (folder / "done").is_file()


def build_assets(root: Path) -> dict[str, Path]:
    """{"shards", "t5", "vae"} under ``root``: synthetic video + image shards, a stand-in T5 folder and a
    tiny VAE run trained for VAE_STEPS steps on other synthetic clips whose last checkpoint holds latent_scale.json."""
    import torch

    from trainer.checkpoint import latest_checkpoint, load_checkpoint
    from trainer.config import stage_config_from_dict
    from trainer.data import heldout_clips, measure_latent_scale, save_latent_scale, DataConfig
    from trainer.models.vae import CausalVAE
    from trainer.runtime import LocalRun
    from trainer.standins import build_t5_standin
    from trainer.synthetic import write_synthetic_shards
    from trainer.train_vae import main as train_vae

    out = {"shards": root / "shards", "t5": root / "t5", "vae": root / "vae_run"}
    if _done(root):
        return out
    root.mkdir(parents=True, exist_ok=True)
    write_synthetic_shards(out["shards"], {VIDEO: list(range(8)), IMAGE: list(range(100, 108))}, per_shard=4)
    build_t5_standin(out["t5"])
    # The VAE is convolutional: trained on 16x16 crops-sized clips (8x cheaper), it encodes any size.
    write_synthetic_shards(root / "vae_shards", {"5x16x16": list(range(200, 208)), "1x16x16": list(range(300, 308))})
    cfg = stage_config_from_dict({
        "model": {"preset": "tiny", "chunk_latent_frames": 0},
        "data": {"root": str(root / "vae_shards"), "buckets": ["5x16x16", "1x16x16"], "weights": [0.7, 0.3],
                 "batch_sizes": [2, 4]},
        "optim": {"lr": 2e-3, "warmup_steps": 5},
        "loss": {"disc_start": 10**9},
        "train": {"steps": VAE_STEPS, "log_every": VAE_STEPS, "eval_every": VAE_STEPS, "ckpt_every": VAE_STEPS,
                  "recon_every": VAE_STEPS, "ema_decay": 0.9},
    })
    train_vae(cfg, LocalRun(out["vae"], device=torch.device("cpu")))
    ckpt = latest_checkpoint(out["vae"])
    state, _ = load_checkpoint(ckpt, rank=0)
    vae = CausalVAE(cfg.model.vae())
    vae.load_state_dict(state["ema"])
    clips = heldout_clips(DataConfig(heldout_root=str(out["shards"]), heldout_bucket=VIDEO, heldout_samples=8),
                          rank=0, world_size=1)
    save_latent_scale(ckpt, measure_latent_scale(vae, [c[None] for c in clips]))
    (root / "done").write_text("ok")
    return out


def build_sample_shards(catalog_db: Path, out: Path) -> Path:
    """The built-in sample's kept clips as shards at small buckets (9-frame videos and images), written by
    the pipeline's shard writer exactly as ``python -m jobs.shards`` does."""
    from catalog.shard_index import select_clips
    from pipeline.buckets import BucketConfig
    from pipeline.shards import ShardConfig, build_shards

    if _done(out):
        return out / "shards"
    result = build_shards(select_clips(catalog_db, "true"), out / "shards", where="true",
                          buckets=BucketConfig(frames=(1, 9), fps=8.0, resolutions=SAMPLE_RESOLUTIONS),
                          shards=ShardConfig(preset="veryfast"))
    if result.errors:
        raise RuntimeError(f"sample shards: {result.errors}")
    (out / "done").write_text(json.dumps(result.manifest["buckets"]))
    return out / "shards"


def dit_stage(assets: dict[str, Path], run_name: str = "dit", **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny DiT stage's TOML tables on the synthetic shards; ``sections`` update single keys."""
    data = {
        "stage": {"kind": "dit"},
        "model": {"preset": "tiny"},
        "vae": {"checkpoint": str(assets["vae"])},
        "text": {"model": str(assets["t5"]), "max_length": 16, "dropout": 0.1},
        "data": {"root": str(assets["shards"]), "buckets": [VIDEO, IMAGE], "weights": [0.6, 0.4],
                 "batch_sizes": [2, 3], "num_workers": 0},
        "diffusion": {"schedule": "tiny", "timestep_bins": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"steps": 4, "log_every": 1, "ckpt_every": 2, "sample_every": 4, "ema_decay": 0.9},
        "sample": {"prompts": ["a red car drives through snow", "a cat on a table"], "steps": 3,
                   "guidance_scale": 3.0},
        "ray": {"name": run_name, "workers": 1},
    }
    for name, table in sections.items():
        data[name] = data.get(name, {}) | table
    return data


SAMPLE_LEARN_STEPS = 400
"""Steps of the tiny DiT trained on the built-in sample (``train_sample_dit``)."""


def sample_dit_stage(assets: dict[str, Path], shards: Path) -> tuple[dict[str, Any], str, int]:
    """(stage tables, video bucket, clips) of the tiny DiT overfitting up to 4 clips of the built-in sample's largest
    video bucket (and images of its size), captions always kept (no dropout), so captions are learnt."""
    from catalog.shards import parse_bucket, read_manifest

    manifest = read_manifest(shards)["buckets"]
    video = max((b for b in manifest if parse_bucket(b)[0] > 1), key=lambda b: manifest[b]["samples"])
    n = min(manifest[video]["samples"], 4)
    image = [b for b in manifest if parse_bucket(b)[0] == 1 and parse_bucket(b)[1:] == parse_bucket(video)[1:]]
    buckets = [video, *image[:1]]
    steps = SAMPLE_LEARN_STEPS
    stage = dit_stage(
        assets,
        data={"root": str(shards), "buckets": buckets, "weights": [0.8, 0.2][:len(buckets)],
              "batch_sizes": [n, 2][:len(buckets)], "shardshuffle": False},
        text={"dropout": 0.0},
        optim={"lr": 2e-3, "warmup_steps": 20, "schedule": "constant"},
        train={"steps": steps, "log_every": 50, "ckpt_every": steps, "sample_every": steps, "ema_decay": 0.9},
        sample={"prompts": []},
    )
    return stage, video, n


def train_sample_dit(assets: dict[str, Path], shards: Path, root: Path) -> dict[str, Any]:
    """The tiny DiT trained once per session on the built-in sample (``sample_dit_stage``): {"run" (its run folder),
    "stage" (tables), "video", "n", "history" (logged metrics)}. The learning test checks it learnt; the
    distillation test distils it."""
    import torch

    from trainer.runtime import LocalRun
    from trainer.train_dit import config_from_dict, main

    stage, video, n = sample_dit_stage(assets, shards)
    out = {"run": root / "run", "stage": stage, "video": video, "n": n}
    if _done(root):
        return out | {"history": json.loads((root / "done").read_text())}
    # The unshuffled streams repeat the bucket's few clips epoch after epoch; the evaluation takes the first n.
    history = main(config_from_dict(stage), LocalRun(out["run"], device=torch.device("cpu")))
    (root / "done").write_text(json.dumps(history))
    return out | {"history": history}
