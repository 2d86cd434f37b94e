"""Config sections of a VAE training stage (one TOML file per stage, one dataclass per section).

``[stage]`` StageConfig, ``[model]`` ModelConfig, ``[data]`` trainer.data.DataConfig, ``[optim]``
OptimConfig, ``[loss]`` trainer.losses.LossConfig, ``[train]`` TrainConfig, ``[ray]`` RayConfig.
``[stage] kind`` names the trainer that runs the file (jobs/train.py dispatches on it); a file
without ``[stage]`` is a VAE stage, so every VAE config written before the key existed stays valid.
``StageConfig``, ``RayConfig`` and ``AdamWConfig`` (CogVideoX's DiT optimizer) are for any stage.
Unknown keys and wrong types raise (catalog/config.py), naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from catalog.config import from_dict, load_toml
from trainer.data import DataConfig
from trainer.losses import LossConfig
from trainer.models.vae import VAE_PRESETS, VAEConfig, vae_config
from trainer.runtime import LRSchedule


@dataclass(frozen=True, kw_only=True, slots=True)
class StageConfig:
    kind: str = "vae"
    """Which training stage this file configures: "vae" (trainer.train_vae); later "dit"."""


def stage_kind(data: dict[str, Any]) -> str:
    """``[stage] kind`` of a stage file's parsed TOML; "vae" when the file has no ``[stage]``."""
    return from_dict(StageConfig, data.get("stage", {}), where="stage").kind


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    preset: str = "tiny"
    """A key of trainer.models.vae.VAE_PRESETS: "tiny" or "cogvideox"."""
    chunk_latent_frames: int = 2
    """Latent frames per temporal chunk (0 = whole clip at once)."""
    checkpointing: str = "none"
    """Activation checkpointing: "none", "block" or "chunk"."""
    shortcut: bool | None = None
    """Pixel <-> latent mean-colour shortcut; None keeps the preset's choice (on for tiny, off for cogvideox)."""

    def __post_init__(self) -> None:
        if self.preset not in VAE_PRESETS:
            raise ValueError(f"ModelConfig.preset: expected one of {sorted(VAE_PRESETS)}, got {self.preset!r}")

    def vae(self) -> VAEConfig:
        extra = {} if self.shortcut is None else {"shortcut": self.shortcut}
        return vae_config(self.preset, chunk_latent_frames=self.chunk_latent_frames, checkpointing=self.checkpointing,
                          **extra)


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of the autoencoder."""
    disc_lr: float = 1e-4
    """Learning rate of the discriminator."""
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many steps, then constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm; 0 disables."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AdamWConfig:
    """AdamW with warm-up then a cosine (or constant) schedule, for any stage's ``[optim]``; the
    defaults are CogVideoX's DiT settings (anchors/trainer.md section 3)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warm-up."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    """Linear warm-up from 0 to lr over this many steps."""
    schedule: str = "cosine"
    """After warm-up: "cosine" (down to min_lr at the stage's last step) or "constant"."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    grad_clip: float = 1.0
    """Clip the global gradient norm; 0 disables."""

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"AdamWConfig.schedule: expected 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"AdamWConfig.min_lr: expected 0 <= min_lr <= lr={self.lr}, got {self.min_lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(f"AdamWConfig: expected warmup_steps >= 0 and grad_clip >= 0, got "
                             f"{self.warmup_steps} and {self.grad_clip}")

    def lr_schedule(self, total_steps: int) -> LRSchedule:
        """The schedule of a stage of ``total_steps`` steps."""
        return LRSchedule(peak=self.lr, warmup_steps=self.warmup_steps, kind=self.schedule,
                          total_steps=total_steps, floor=self.min_lr)

    def optimizer(self, params: Any) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    steps: int = 1000
    """Total optimizer steps of this stage (a resumed run continues up to this)."""
    seed: int = 0
    log_every: int = 10
    """Report metrics (loss parts, throughput) every N steps."""
    eval_every: int = 100
    """Held-out PSNR every N steps (a multiple of log_every)."""
    ckpt_every: int = 500
    """Checkpoint every N steps (a multiple of log_every); the last step always checkpoints."""
    recon_every: int = 500
    """Write reconstruction videos into the checkpoint every N steps (a multiple of ckpt_every)."""
    ema_decay: float = 0.999
    strategy: str = "ddp"
    """Data parallelism: "ddp" or "fsdp" (FSDP2 fully_shard per residual block)."""
    precision: str = "auto"
    """"auto" = bf16 autocast on CUDA, fp32 on CPU; "fp32" forces fp32 everywhere."""
    init_from: str = ""
    """Checkpoint (or run folder; its latest checkpoint is used) whose model/EMA weights start
    this stage, e.g. stage 1's run for stage 2. Ignored when resuming this stage's own run."""

    def __post_init__(self) -> None:
        for name in ("log_every", "eval_every", "ckpt_every", "recon_every", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        for name, base in (("eval_every", "log_every"), ("ckpt_every", "log_every"), ("recon_every", "ckpt_every")):
            if getattr(self, name) % getattr(self, base):
                raise ValueError(
                    f"TrainConfig.{name}={getattr(self, name)} must be a multiple of {base}={getattr(self, base)}"
                )
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"TrainConfig.strategy: expected 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.precision not in ("auto", "fp32"):
            raise ValueError(f"TrainConfig.precision: expected 'auto' or 'fp32', got {self.precision!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RayConfig:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage_path: str = "runs"
    """Where Ray Train writes checkpoints and results (local folder or URI)."""
    name: str = "vae"
    """Run name; re-running with the same name resumes from its latest checkpoint."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VAEStageConfig:
    stage: StageConfig = StageConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()

    PATH_FIELDS: ClassVar[tuple[str, ...]] = (
        "data.root", "data.heldout_root", "train.init_from", "loss.perceptual_weights", "ray.storage_path")
    """Dotted fields holding paths; jobs/train.py makes them absolute before handing the config to workers."""

    def __post_init__(self) -> None:
        if self.stage.kind != "vae":
            raise ValueError(f"VAEStageConfig: expected [stage] kind = 'vae', got {self.stage.kind!r}")


def load_stage_config(path: str | Path) -> VAEStageConfig:
    """Every section from one TOML file; an unknown section or key raises, naming it."""
    return stage_config_from_dict(load_toml(path))


def stage_config_from_dict(data: dict[str, Any]) -> VAEStageConfig:
    """Each section is built from its own table only (``from_dict(ModelConfig, data["model"])`` ...)."""
    return from_dict(VAEStageConfig, data, where="vae stage")


def stage_config_to_dict(cfg: VAEStageConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = [
    "AdamWConfig", "ModelConfig", "OptimConfig", "RayConfig", "StageConfig", "TrainConfig", "VAEStageConfig",
    "load_stage_config", "stage_config_from_dict", "stage_config_to_dict", "stage_kind",
]
