"""The DiT stage in one process: config, data checked first, resume, samples beside the checkpoint, learning.

Every test shares the session's tiny trained VAE, stand-in T5 and shards (``dit_assets``,
tests/dit_fixtures.py). The 2-worker Ray Train run is in tests/jobs/test_dit_jobs.py.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

from trainer.checkpoint import latest_checkpoint, load_checkpoint, write_video
from trainer.config import RayConfig
from trainer.data import DiTBatches, DiTDataConfig, batch_latents, posterior_generator
from trainer.diffusion import alphas_cumprod
from trainer.models.dit import DiT, DiTConfig
from trainer.runtime import LocalRun, seed_everything
from trainer.sampling import Sampler, load_vae
from trainer.text import TextEncoder
from trainer.train_dit import config_from_dict, fixed_eval_loss, main

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/dit_fixtures.py, shared with tests/jobs
import dit_fixtures  # noqa: E402

CPU = torch.device("cpu")


def cfg_for(assets: dict[str, Path], **sections: dict[str, Any]):
    return config_from_dict(dit_fixtures.dit_stage(assets, **sections))


def test_config_names_the_bad_key_or_value(dit_assets) -> None:
    with pytest.raises(ValueError, match="unknown key.*'stepz'"):
        cfg_for(dit_assets, train={"stepz": 3})
    with pytest.raises(ValueError, match="expected \\[stage\\] kind = 'dit', got 'vae'"):
        cfg_for(dit_assets, stage={"kind": "vae"})
    with pytest.raises(ValueError, match="sample_every=3 must be a multiple of ckpt_every=2"):
        cfg_for(dit_assets, train={"sample_every": 3})
    with pytest.raises(ValueError, match="warmup_steps=10 must be below \\[train\\] steps=4"):
        cfg_for(dit_assets, optim={"warmup_steps": 10})
    with pytest.raises(ValueError, match="preset: expected one of"):
        cfg_for(dit_assets, model={"preset": "7b"})
    cfg = cfg_for(dit_assets)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.ray, RayConfig)
    assert config_from_dict(__import__("dataclasses").asdict(cfg)) == cfg  # what Ray workers receive


def test_a_missing_bucket_fails_before_any_model_is_loaded(dit_assets, tmp_path: Path) -> None:
    # The VAE checkpoint does not exist either: the error must be the data's, raised first.
    cfg = cfg_for(dit_assets, vae={"checkpoint": str(tmp_path / "no_vae")},
                  data={"buckets": ["9x32x32", "49x32x32"], "weights": [1, 1], "batch_sizes": [1, 1]})
    with pytest.raises(FileNotFoundError, match="bucket 49x32x32: expected the folder"):
        main(cfg, LocalRun(tmp_path / "run", device=CPU))
    assert not (tmp_path / "run").exists()


def _decode_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_resume_continues_with_the_same_next_step_loss(dit_assets, tmp_path: Path) -> None:
    straight = main(cfg_for(dit_assets), LocalRun(tmp_path / "straight", device=CPU))
    assert [m["step"] for m in straight] == [1, 2, 3, 4]
    # Joint image-video: both kinds were drawn, each logged under its own key.
    assert any("loss_image" in m for m in straight) and any("loss_video" in m for m in straight)

    # A run stopped after its step-2 checkpoint: the same config resumed from that checkpoint alone.
    shutil.copytree(tmp_path / "straight" / "checkpoint_000002", tmp_path / "split" / "checkpoint_000002")
    resumed = main(cfg_for(dit_assets), LocalRun(tmp_path / "split", device=CPU))
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed, strict=True):
        for key in [k for k in a if k.startswith("loss") or k == "grad_norm"]:
            assert b[key] == a[key], f"{key} at step {a['step']}: resumed {b[key]} vs uninterrupted {a[key]}"

    end_a, _ = load_checkpoint(latest_checkpoint(tmp_path / "straight"), rank=0)
    end_b, _ = load_checkpoint(latest_checkpoint(tmp_path / "split"), rank=0)
    assert end_a["data_position"] == end_b["data_position"]
    for part in ("model", "ema"):
        for key, value in end_a[part].items():
            assert torch.equal(end_b[part][key], value), f"{part}.{key}"


def test_bad_samples_are_skipped_counted_in_the_metrics_then_stop_the_stage(dit_assets, tmp_path: Path) -> None:
    from catalog.shards import Bucket, BucketTarWriter, make_manifest, write_manifest
    from trainer.data import BadDataError
    from trainer.synthetic import synthetic_files

    root = tmp_path / "shards"
    writer = BucketTarWriter(root, dit_fixtures.VIDEO, maxcount=8, maxsize=2**62)
    for i in range(8):
        files = synthetic_files(i, dit_fixtures.VIDEO)
        if i == 1:
            files.pop("txt")  # no caption
        writer.write(f"clip{i:04d}", files)
    write_manifest(root, make_manifest(writer.close(), {dit_fixtures.VIDEO: Bucket(9, 32, 32, 8.0)}, source="test"))
    video_only = {"root": str(root), "buckets": [dit_fixtures.VIDEO], "weights": [1.0], "batch_sizes": [2],
                  "bad_check_after": 4}
    one_step = {"optim": {"warmup_steps": 0}, "sample": {"prompts": []}}
    with pytest.warns(UserWarning, match="no caption"):
        history = main(cfg_for(dit_assets, data=video_only | {"max_bad_fraction": 0.2},
                               train={"steps": 2, "ckpt_every": 2, "sample_every": 2}, **one_step),
                       LocalRun(tmp_path / "ok", device=CPU))
    assert history[-1]["data_bad_samples"] == 1 and history[-1]["data_samples_read"] == 4
    # 1 bad in 2 read is past 10 % once the fraction is checked: the stage stops naming the shard.
    with pytest.warns(UserWarning), pytest.raises(BadDataError, match="clip0001|shard-000000"):
        main(cfg_for(dit_assets, data=video_only | {"max_bad_fraction": 0.1, "bad_check_after": 2},
                     train={"steps": 2, "ckpt_every": 2, "sample_every": 2}, **one_step),
             LocalRun(tmp_path / "stop", device=CPU))


def test_latent_scale_is_measured_when_the_vae_checkpoint_has_none(dit_assets, tmp_path: Path) -> None:
    vae_run = tmp_path / "vae_run"
    shutil.copytree(dit_assets["vae"], vae_run)
    ckpt = latest_checkpoint(vae_run)
    stored = json.loads((ckpt / "latent_scale.json").read_text())["latent_scale"]
    (ckpt / "latent_scale.json").unlink()
    one_step = {"train": {"steps": 1, "ckpt_every": 1, "sample_every": 1}, "optim": {"warmup_steps": 0},
                "sample": {"prompts": []}}
    with pytest.raises(FileNotFoundError, match="latent scale: data.latent_scale is 0"):
        main(cfg_for(dit_assets, vae={"checkpoint": str(vae_run)}, **one_step), LocalRun(tmp_path / "a", device=CPU))
    got = main(cfg_for(dit_assets, vae={"checkpoint": str(vae_run), "scale_batches": 4}, **one_step),
               LocalRun(tmp_path / "b", device=CPU))[-1]["latent_scale"]
    assert got == pytest.approx(stored, rel=0.25)  # 1/std of other clips of the same VAE
    state, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"), rank=0)
    assert state["latent_scale"] == got  # stored with the DiT checkpoint, so a resume keeps it
    set_scale = main(cfg_for(dit_assets, data={"latent_scale": 0.5}, **one_step), LocalRun(tmp_path / "c", device=CPU))
    assert set_scale[-1]["latent_scale"] == 0.5
    # A stage that continues b's weights (the HQ fine-tune) trains at b's scale: the VAE still stores none, and no
    # [vae] scale_batches is set, so without the rule it would stop as in "a".
    cont = one_step | {"train": one_step["train"] | {"init_from": str(tmp_path / "b")}}
    assert main(cfg_for(dit_assets, vae={"checkpoint": str(vae_run)}, **cont),
                LocalRun(tmp_path / "d", device=CPU))[-1]["latent_scale"] == got


def test_next_stage_starts_from_the_previous_stages_ema_weights(dit_assets, tmp_path: Path) -> None:
    main(cfg_for(dit_assets, train={"steps": 2, "ckpt_every": 2, "sample_every": 2}, optim={"warmup_steps": 1},
                 sample={"prompts": []}), LocalRun(tmp_path / "stage_a", device=CPU))
    stage_a, _ = load_checkpoint(latest_checkpoint(tmp_path / "stage_a"), rank=0)
    # The next stage on other buckets (images only here); lr = 0 and ema_decay = 1 keep the weights it started from.
    main(cfg_for(dit_assets, data={"buckets": ["1x32x32"], "weights": [1.0], "batch_sizes": [2]},
                 optim={"lr": 0.0, "warmup_steps": 0, "schedule": "constant"},
                 train={"steps": 1, "ckpt_every": 1, "sample_every": 1, "ema_decay": 1.0,
                        "init_from": str(tmp_path / "stage_a")}, sample={"prompts": []}),
         LocalRun(tmp_path / "stage_b", device=CPU))
    stage_b, _ = load_checkpoint(latest_checkpoint(tmp_path / "stage_b"), rank=0)
    for key, value in stage_a["ema"].items():
        assert torch.equal(stage_b["model"][key], value), key
    assert any(not torch.equal(stage_a["ema"][k], stage_a["model"][k]) for k in stage_a["ema"])  # EMA, not raw


def test_checkpoint_records_the_encoders_and_samples_sit_beside_it(dit_assets, tmp_path: Path) -> None:
    main(cfg_for(dit_assets), LocalRun(tmp_path / "run", device=CPU))
    folder = tmp_path / "run" / "checkpoint_000004"
    state, _ = load_checkpoint(folder, rank=0)
    assert state["text_encoder"]["standin"] is True and "stand-in" in state["text_encoder"]["description"]
    stored = json.loads((latest_checkpoint(dit_assets["vae"]) / "latent_scale.json").read_text())["latent_scale"]
    assert state["latent_scale"] == pytest.approx(stored)
    assert state["dit_config"]["text_dim"] == 32 and state["dit_config"]["max_text_len"] == 16
    assert not list((tmp_path / "run" / "checkpoint_000002").glob("*.mp4"))  # sample_every = 4

    # One mp4 per prompt (9 frames of 32x32: the first video bucket) and one contact sheet.
    videos = sorted(folder.glob("sample_step000004_*.mp4"))
    assert [p.name for p in videos] == ["sample_step000004_0.mp4", "sample_step000004_1.mp4"]
    frames = [_decode_frames(p) for p in videos]
    assert [len(f) for f in frames] == [9, 9] and frames[0][0].shape == (32, 32, 3)
    sheet = Image.open(folder / "samples_step000004.png")
    assert sheet.size[0] == 6 * 32 and sheet.size[1] == 2 * (32 + 14)
    meta = json.loads((folder / "samples_step000004.json").read_text())
    assert meta["prompts"] == ["a red car drives through snow", "a cat on a table"] and meta["weights"] == "ema"

    # The same checkpoint sampled afterwards (jobs.sample's path) gives the same first video.
    sampler = Sampler.from_checkpoint(folder, device=CPU)
    again = sampler.generate(["a red car drives through snow"], frames=9, height=32, width=32, steps=3,
                             guidance_scale=3.0)[0]
    # The encoder is deterministic, so the same frames give the same bytes.
    assert write_video(tmp_path / "again.mp4", again).read_bytes() == videos[0].read_bytes()


# ---------------------------------------------------------------------------------------------
# Learning is real: a few clips of the built-in sample, overfit; captions matter
# ---------------------------------------------------------------------------------------------

LEARN_STEPS = 400
LOSS_FALL = 3.0
"""Fixed-timestep loss of the untrained model over that of the trained one, on the training clips.
Measured here (1 thread, seeds fixed): 1.717 -> 0.386 after 400 steps, x4.45 (x3.74 after 300)."""
CAPTION_GAP = 1.2
"""Loss with every clip given another clip's caption over the loss with its own: measured 0.629 / 0.386 = 1.63."""


def _clips(root: Path, bucket: str, n: int, vae, scale: float, encoder) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every sample of ``bucket``: DiT latents (n, t, C, h, w), caption embeddings (n, L, D) and captions."""
    data = DiTDataConfig(root=str(root), buckets=(bucket,), weights=(1.0,), batch_sizes=(n,), shardshuffle=False,
                         num_workers=0)
    batch = next(iter(DiTBatches(data, seed=0)))
    x0 = batch_latents(batch, scale=scale, vae=vae, generator=posterior_generator(0, 0, 0)).permute(0, 2, 1, 3, 4)
    return x0, encoder.encode(batch["captions"])[0].float(), batch["captions"]


@pytest.mark.slow
def test_the_tiny_dit_overfits_sample_clips_and_uses_their_captions(dit_assets, sample_dit_shards, sample_dit_run
                                                                     ) -> None:
    # The session's tiny DiT trained LEARN_STEPS steps on the sample's clips (tests/dit_fixtures.py train_sample_dit).
    assert dit_fixtures.SAMPLE_LEARN_STEPS == LEARN_STEPS
    cfg = config_from_dict(sample_dit_run["stage"])
    video, n, history = sample_dit_run["video"], sample_dit_run["n"], sample_dit_run["history"]
    run = sample_dit_run["run"]

    vae, folder = load_vae(dit_assets["vae"], device=CPU)
    scale = history[-1]["latent_scale"]
    encoder = TextEncoder(cfg.text, CPU)
    x0, text, captions = _clips(sample_dit_shards, video, n, vae, scale, encoder)
    state, _ = load_checkpoint(latest_checkpoint(run), rank=0)
    dit_cfg = DiTConfig(**{k: v for k, v in state["dit_config"].items()})
    ac = alphas_cumprod(cfg.diffusion.schedule_config())
    seed_everything(cfg.train.seed)  # main's initial weights
    untrained = DiT(dit_cfg)
    trained = DiT(dit_cfg)
    trained.load_state_dict(state["model"])

    before = fixed_eval_loss(untrained, x0, text, ac).mean().item()
    after = fixed_eval_loss(trained, x0, text, ac).mean().item()
    shuffled = torch.roll(text, 1, dims=0)  # every clip gets another clip's caption
    assert len(set(captions)) == n, f"expected distinct captions, got {captions}"
    mismatched = fixed_eval_loss(trained, x0, shuffled, ac).mean().item()
    print(f"{n} clips of {video}: fixed-timestep loss untrained {before:.4f} -> trained {after:.4f} "
          f"(x{before / after:.2f}); matched captions {after:.4f} vs shuffled {mismatched:.4f}; "
          f"train loss first {history[0]['loss']:.4f} last {history[-1]['loss']:.4f}; "
          f"tokens/s {history[-1]['tokens_per_s']:.0f}")
    assert before / after > LOSS_FALL, f"loss fell only x{before / after:.2f}: {before:.4f} -> {after:.4f}"
    assert mismatched > CAPTION_GAP * after, f"matched captions {after:.4f} vs shuffled {mismatched:.4f}"
