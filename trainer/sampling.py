"""Sample videos from a DiT: prompts -> T5 -> DDIM + classifier-free guidance -> frozen VAE -> mp4 and sheet.

The DiT stage calls ``write_samples`` with its EMA model every ``sample_every`` steps (rank 0, beside
the checkpoint); ``python -m jobs.sample`` builds the same ``Sampler`` from a checkpoint folder
(``Sampler.from_checkpoint``), so a sample written during training and one written afterwards from
the same checkpoint, prompt and seed are the same video.

Latent layouts: the VAE's are channels-first (B, C, t, h, w), the DiT's time-first (B, t, C, h, w).
The DiT denoises scaled latents (posterior sample x latent scale); the VAE decodes latents / scale.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from catalog.config import from_dict
from trainer.checkpoint import write_video
from trainer.config import ModelConfig
from trainer.data import to_uint8
from trainer.diffusion import GuidanceConfig, ScheduleConfig, alphas_cumprod, guided_sample
from trainer.models.dit import DiT, DiTConfig
from trainer.models.latte import Latte, latte_from_dit
from trainer.models.vae import CausalVAE, latent_frames
from trainer.runtime import autocast_for, load_init
from trainer.text import TextConfig, TextEncoder


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleConfig:
    """``[sample]`` of a DiT stage: what the EMA model draws beside each sampled checkpoint."""

    prompts: tuple[str, ...] = ()
    """Fixed prompts, one video each; empty writes no samples."""
    steps: int = 50
    """DDIM steps (CogVideoX's pipeline: 50)."""
    guidance_scale: float = 6.0
    """Classifier-free guidance weight (CogVideoX's pipeline: 6); 1 turns guidance off."""
    frames: int = 0
    """Pixel frames (4k+1, 1 = an image); 0 = the first video bucket's."""
    height: int = 0
    """Pixels, a multiple of 16; 0 = the first video bucket's."""
    width: int = 0
    seed: int = 0
    """Noise seed; prompt i draws from (seed, i), so every sample is reproducible on its own."""
    fps: int = 8
    """Frame rate written into the mp4, and the frame rate a model with fps_conditioning is asked for."""
    guidance: str = "constant"
    """The guidance weight schedule (trainer.diffusion.GuidanceConfig): "constant" (guidance_scale),
    "dynamic_cosine" (CogVideoX's ramp 1 -> 1 + guidance_scale) or "oscillating" (Imagen Video)."""
    oscillating_high: float = 15.0
    oscillating_low: float = 1.0
    oscillating_high_steps: int = 1
    """Steps at oscillating_high before high and low alternate."""
    dynamic_threshold: float = 0.0
    """Percentile of Imagen's dynamic thresholding of x0 (e.g. 0.95); 0 = off."""
    threshold_floor: float = 1.0
    """Its data range [-floor, floor]; about 2 for unit-variance latents (see GuidanceConfig)."""
    motion_guidance: float = 0.0
    """GenTron's lambda_M (1.0 .. 1.3) for a model trained with p_motion_free > 0; 0 = plain CFG."""

    def guidance_config(self) -> GuidanceConfig:
        return GuidanceConfig(schedule=self.guidance, scale=self.guidance_scale, high=self.oscillating_high,
                              low=self.oscillating_low, high_steps=self.oscillating_high_steps,
                              dynamic_threshold=self.dynamic_threshold or None, threshold_floor=self.threshold_floor,
                              motion_scale=self.motion_guidance or None)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"SampleConfig.steps: expected >= 1, got {self.steps}")
        if self.frames < 0 or (self.frames and (self.frames - 1) % 4):
            raise ValueError(f"SampleConfig.frames: expected 0 or 4k+1 (1, 9, 17, 49, ...), got {self.frames}")
        for name in ("height", "width"):
            if getattr(self, name) < 0 or getattr(self, name) % 16:
                raise ValueError(f"SampleConfig.{name}: expected 0 or a multiple of 16, got {getattr(self, name)}")
        if self.fps < 1:
            raise ValueError(f"SampleConfig.fps: expected >= 1, got {self.fps}")
        if self.motion_guidance < 0:
            raise ValueError(f"SampleConfig.motion_guidance: expected 0 (off) or > 0, got {self.motion_guidance}")
        self.guidance_config()  # the guidance fields' own checks


def load_vae(checkpoint: str | Path, weights: str = "ema", device: torch.device | str = "cpu"
             ) -> tuple[CausalVAE, Path]:
    """The frozen VAE of a VAE stage's checkpoint (or run folder: its latest checkpoint), in eval mode,
    built from the config stored with it; returns (vae, checkpoint folder)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"vae.weights: expected 'ema' or 'model', got {weights!r}")
    folder, state = load_init(checkpoint)
    stored = state.get("config", {}).get("model")
    if stored is None:
        raise ValueError(f"vae checkpoint {folder}: expected a VAE stage checkpoint with config.model, found none")
    vae = CausalVAE(from_dict(ModelConfig, dict(stored), where=f"{folder} config.model").vae())
    vae.load_state_dict(state[weights])
    return vae.to(device).eval().requires_grad_(False), folder


def noise_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator of sample ``index``'s starting noise: independent of the device and of the other prompts."""
    digest = hashlib.sha256(f"sample-noise:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class Sampler:
    """What turns prompts into videos: DiT (EMA weights), frozen VAE, frozen T5 and the schedule."""

    dit: nn.Module
    vae: CausalVAE
    encoder: TextEncoder
    schedule: ScheduleConfig
    latent_scale: float
    device: torch.device
    precision: str = "auto"
    ac: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.ac = alphas_cumprod(self.schedule)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, device: torch.device | str = "cpu", weights: str = "ema",
                        precision: str = "auto") -> Sampler:
        """A Sampler from a DiT stage checkpoint (or run folder: its latest checkpoint)."""
        if weights not in ("ema", "model"):
            raise ValueError(f"weights: expected 'ema' or 'model', got {weights!r}")
        device = torch.device(device)
        folder, state = load_init(checkpoint)
        if "dit_config" not in state:
            raise ValueError(f"checkpoint {folder}: expected a DiT stage checkpoint (with dit_config), got keys "
                             f"{sorted(state)}")
        dit_cfg = from_dict(DiTConfig, dict(state["dit_config"]), where="dit_config")
        attention = state.get("config", {}).get("model", {}).get("attention", "full")
        dit = DiT(dit_cfg) if attention == "full" else Latte(latte_from_dit(dit_cfg, attention.removeprefix("latte_")))
        dit.load_state_dict(state[weights])
        vae, _ = load_vae(state["vae_checkpoint"], state["config"]["vae"]["weights"], device)
        encoder = TextEncoder(from_dict(TextConfig, dict(state["config"]["text"]), where="text"), device)
        return cls(dit.to(device).eval().requires_grad_(False), vae, encoder,
                   from_dict(ScheduleConfig, dict(state["schedule"]), where="schedule"), float(state["latent_scale"]),
                   device, precision)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, frames: int, height: int, width: int, steps: int = 50,
                 guidance_scale: float = 6.0, seed: int = 0, guidance: GuidanceConfig | None = None,
                 fps: float = 8.0) -> list[np.ndarray]:
        """One video per prompt, each (frames, height, width, 3) uint8. ``guidance`` (schedule,
        thresholding, motion-free) replaces the constant ``guidance_scale`` when given; ``fps`` is the
        frame rate asked of a model with fps_conditioning."""
        guidance = guidance or GuidanceConfig(scale=guidance_scale)
        plain = guidance.schedule == "constant" and guidance.scale == 1.0 and guidance.motion_scale is None
        vc = self.vae.cfg
        if height % (2 * vc.spatial_factor) or width % (2 * vc.spatial_factor):
            raise ValueError(f"sample size: expected height and width divisible by {2 * vc.spatial_factor} "
                             f"(VAE x patch), got {height}x{width}")
        t = latent_frames(frames, vc.temporal_factor)
        shape = (1, t, vc.latent_channels, height // vc.spatial_factor, width // vc.spatial_factor)  # (1, t, C, h, w)
        was_training = self.dit.training
        self.dit.eval()
        autocast = autocast_for(self.device, self.precision)
        null_text = self.encoder.empty()[0][None].float()  # (1, L, D)
        videos = []
        try:
            for i, prompt in enumerate(prompts):
                text = self.encoder.encode([prompt])[0].float()  # (1, L, D)
                noise = torch.randn(shape, generator=noise_generator(seed, i)).to(self.device)
                cond = ({"fps": torch.full((1,), float(fps), device=self.device)}
                        if getattr(self.dit.cfg, "fps_conditioning", False) else None)
                # A guidance-distilled student (trainer/distill.py) takes each step's weight as an input: one pass.
                student = getattr(self.dit.cfg, "guidance_conditioning", False)
                with autocast:
                    z = guided_sample(self.dit, noise, text, ac=self.ac, num_steps=steps, guidance=guidance,
                                      null_text=None if plain else null_text, conditioning=cond,
                                      guidance_input=student).x0  # (1, t, C, h, w)
                z = (z.float() / self.latent_scale).permute(0, 2, 1, 3, 4)  # (1, C, t, h, w)
                x = self.vae.decode(z)  # (1, 3, frames, H, W)
                videos.append(to_uint8(x[0]))
        finally:
            self.dit.train(was_training)
        return videos


# ---------------------------------------------------------------------------------------------
# Files: one mp4 per prompt and one contact sheet
# ---------------------------------------------------------------------------------------------


def contact_sheet(videos: list[np.ndarray], captions: list[str], *, columns: int = 6, label_height: int = 14
                  ) -> Image.Image:
    """One row per video: ``columns`` frames evenly spaced over the clip, under a line of its caption."""
    if not videos:
        raise ValueError("contact_sheet: expected at least one video, got none")
    h, w = videos[0].shape[1:3]
    sheet = Image.new("RGB", (columns * w, len(videos) * (h + label_height)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, (video, caption) in enumerate(zip(videos, captions, strict=True)):
        top = r * (h + label_height)
        draw.text((2, top + 1), caption[: max(8, columns * w // 6)], fill=(230, 230, 230))
        picks = np.linspace(0, len(video) - 1, min(columns, len(video))).round().astype(int)
        for c, k in enumerate(picks):
            sheet.paste(Image.fromarray(video[k]), (c * w, top + label_height))
    return sheet


def write_samples(folder: str | Path, step: int, videos: list[np.ndarray], prompts: list[str], *, fps: int = 8,
                  info: dict[str, Any] | None = None) -> list[Path]:
    """``sample_step{N}_{i}.mp4`` per video, ``samples_step{N}.png`` (the contact sheet) and
    ``samples_step{N}.json`` (prompts and sampler settings) into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_video(folder / f"sample_step{step:06d}_{i}.mp4", v, fps=fps) for i, v in enumerate(videos)]
    sheet = folder / f"samples_step{step:06d}.png"
    contact_sheet(videos, prompts).save(sheet)
    meta = folder / f"samples_step{step:06d}.json"
    meta.write_text(json.dumps({"step": step, "prompts": list(prompts), "files": [p.name for p in paths]}
                               | (info or {}), indent=1))
    return [*paths, sheet, meta]


__all__ = ["SampleConfig", "Sampler", "contact_sheet", "load_vae", "noise_generator", "write_samples"]
