"""Issue 10's options in the DiT stage: motion-free training with static pseudo-videos, frame-rate
conditioning from the batch, Latte attention, and the guided sampler reading them from the checkpoint.

Uses the session's tiny VAE, stand-in T5 and synthetic shards (``dit_assets``, tests/dit_fixtures.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpoint import load_checkpoint
from trainer.models.latte import Latte
from trainer.runtime import LocalRun
from trainer.sampling import Sampler
from trainer.train_dit import config_from_dict, main, step_conditioning

sys.path.append(str(Path(__file__).resolve().parents[1]))
import dit_fixtures  # noqa: E402

CPU = torch.device("cpu")
SHORT = {"train": {"steps": 2, "log_every": 1, "ckpt_every": 2, "sample_every": 2}, "optim": {"warmup_steps": 0}}


def cfg_for(assets: dict[str, Path], **sections: dict[str, Any]):
    return config_from_dict(dit_fixtures.dit_stage(assets, **(SHORT | sections)))


def test_options_are_refused_when_malformed(dit_assets) -> None:
    with pytest.raises(ValueError, match="attention"):
        cfg_for(dit_assets, model={"attention": "latte_v5"})
    with pytest.raises(ValueError, match="p_motion_free"):
        cfg_for(dit_assets, diffusion={"p_motion_free": 1.5})
    with pytest.raises(ValueError, match="schedule"):
        cfg_for(dit_assets, sample={"guidance": "cosine"})


def test_motion_free_pseudo_videos_and_fps_train_and_sample_from_the_checkpoint(dit_assets, tmp_path: Path) -> None:
    cfg = cfg_for(dit_assets, model={"fps_conditioning": True},
                  diffusion={"p_motion_free": 1.0, "pseudo_video_frames": 3},
                  sample={"prompts": ["a cat on a table"], "steps": 4, "guidance": "oscillating",
                          "oscillating_high_steps": 2, "motion_guidance": 1.2, "dynamic_threshold": 0.95,
                          "threshold_floor": 2.0})
    history = main(cfg, LocalRun(tmp_path / "run", device=CPU))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    state, _ = load_checkpoint(tmp_path / "run" / "checkpoint_000002", rank=0)
    assert state["dit_config"]["fps_conditioning"] is True
    assert state["config"]["diffusion"]["p_motion_free"] == 1.0
    assert any(k.startswith("ofs_embedding.") for k in state["ema"])
    assert list((tmp_path / "run" / "checkpoint_000002").glob("sample_step000002_0.mp4"))
    sampler = Sampler.from_checkpoint(tmp_path / "run", device=CPU)
    video = sampler.generate(["a cat on a table"], frames=9, height=32, width=32, steps=2, fps=24,
                             guidance=cfg.sample.guidance_config())[0]
    assert video.shape == (9, 32, 32, 3)
    # the sample command takes the same options
    from jobs.sample import main as sample_job

    out = tmp_path / "samples"
    assert sample_job(["--checkpoint", str(tmp_path / "run"), "--prompt", "a cat", "--frames", "9", "--steps", "2",
                       "--schedule", "dynamic_cosine", "--motion-guidance", "1.1", "--fps", "24",
                       "--output", str(out)]) == 0
    meta = json.loads(next(out.glob("samples_step*.json")).read_text())
    assert (meta["guidance"], meta["motion_guidance"], meta["fps"]) == ("dynamic_cosine", 1.1, 24)
    assert sample_job(["--checkpoint", str(tmp_path / "run"), "--prompt", "a cat", "--frames", "9",
                       "--dynamic-threshold", "1.5", "--output", str(tmp_path / "bad")]) == 2


def test_step_conditioning_gives_images_the_image_fps(dit_assets) -> None:
    cfg = cfg_for(dit_assets, model={"fps_conditioning": True, "image_fps": 120.0}, diffusion={"p_motion_free": 0.5})
    cond = step_conditioning(cfg, {"fps": torch.tensor([8.0, 0.0, 24.0])}, step=3, rank=0, batch_size=3, device=CPU)
    assert cond["fps"].tolist() == [8.0, 120.0, 24.0]
    assert cond["motion_free"].dtype == torch.bool and cond["motion_free"].shape == (3,)
    assert step_conditioning(cfg_for(dit_assets), {"fps": torch.zeros(2)}, step=3, rank=0, batch_size=2,
                             device=CPU) == {}


def test_latte_attention_trains_in_the_same_loop_and_samples(dit_assets, tmp_path: Path) -> None:
    cfg = cfg_for(dit_assets, model={"attention": "latte_interleaved"}, sample={"prompts": []})
    history = main(cfg, LocalRun(tmp_path / "run", device=CPU))
    assert len(history) == 2 and history[-1]["loss"] > 0
    state, _ = load_checkpoint(tmp_path / "run" / "checkpoint_000002", rank=0)
    assert any(k.startswith("blocks.") for k in state["ema"])
    sampler = Sampler.from_checkpoint(tmp_path / "run", device=CPU)
    assert isinstance(sampler.dit, Latte) and sampler.dit.cfg.variant == "interleaved"
    video = sampler.generate(["a red car drives through snow"], frames=9, height=32, width=32, steps=2,
                             guidance_scale=3.0)[0]
    assert video.shape == (9, 32, 32, 3)
    # diffusers has no class for it: the export command refuses in one line (exit 2) and writes nothing
    from jobs.export import main as export_job

    out = tmp_path / "diffusers"
    assert export_job(["--checkpoint", str(tmp_path / "run"), "--to", "diffusers", "--output", str(out)]) == 2
    assert not out.exists() or not any(out.iterdir())
