"""DiT training stage (joint image-video): ``main(cfg, run)`` reads top to bottom; Ray Train calls it on every worker.

One stage of CogVideoX's progressive recipe is one TOML config (jobs/configs/dit_256.toml, then
dit_512.toml ``init_from`` the 256 run's EMA). Each step draws one bucket (images are 1-frame
buckets, one latent frame) by a seeded draw that is the same on every rank; the frozen VAE turns the
pixels into a scaled posterior sample (or the shards carry precomputed moments), the frozen T5 the
captions into embeddings (10 % replaced by the empty prompt), and the DiT learns v at stratified
timesteps (global sample i of N from slice i of [0, 1000), any world size).

Everything random in a step (posterior noise, diffusion noise, timesteps, caption dropout) is a pure
function of (seed, step, rank), so a resumed run repeats the uninterrupted run's next step exactly.

Sections: ``[stage]`` kind = "dit", ``[model]`` ModelSection, ``[vae]`` VAESection, ``[text]``
trainer.text.TextConfig, ``[data]`` trainer.data.DiTDataConfig, ``[diffusion]`` DiffusionSection,
``[optim]`` trainer.config.AdamWConfig, ``[train]`` DiTTrainConfig, ``[sample]``
trainer.sampling.SampleConfig, ``[standins]`` StandinSection, ``[ray]`` trainer.config.RayConfig.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from catalog.config import from_dict
from catalog.shards import parse_bucket
from trainer.config import AdamWConfig, RayConfig, StageConfig
from trainer.data import (
    DiTBatches,
    DiTDataConfig,
    batch_latents,
    batch_text,
    check_data,
    posterior_generator,
    resolve_latent_scale,
)
from trainer.diffusion import (
    SCHEDULE_PRESETS,
    ScheduleConfig,
    alphas_cumprod,
    diffusion_loss,
    motion_free_draw,
    q_sample,
    stratified_timesteps,
    timestep_bins,
)
from trainer.metrics import MetricWindow, data_metrics, peak_flops
from trainer.models.dit import DIT_PRESETS, Block, DiT, DiTConfig, dit_config, flops_per_token
from trainer.models.latte import (LATTE_VARIANTS, FactorisedAttentionBlock, FactorisedHeadsBlock, Latte, SpatialBlock,
                                  TemporalBlock, latte_flops, latte_from_dit)
from trainer.runtime import (
    EMA,
    LocalRun,
    RunContext,
    autocast_for,
    find_resume,
    load_init,
    load_optimizer_state,
    model_state,
    optimizer_state,
    rank_seed,
    restore_rng,
    run_worker,
    save_and_report,
    seed_everything,
    set_lr,
    wrap,
)
from trainer.sampling import SampleConfig, Sampler, load_vae, write_samples
from trainer.standins import build_t5_standin
from trainer.text import CaptionDropout, TextConfig, TextEncoder

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSection:
    preset: str = "tiny"
    """A key of trainer.models.dit.DIT_PRESETS: "tiny", "2b" or "5b"."""
    checkpointing: bool = False
    """Recompute each transformer block in the backward pass."""
    pos_embed: str = ""
    """"sincos" or "rope"; empty keeps the preset's."""
    attention: str = "full"
    """"full": CogVideoX's 3D full attention. "latte_interleaved", "latte_late_fusion",
    "latte_factorised_attention", "latte_factorised_heads": Latte's factorised variant (trainer/models/latte.py)
    at the preset's depth, width and heads; not exportable to diffusers."""
    fps_conditioning: bool = False
    """CogVideo's frame-rate conditioning: the batch's fps (source fps / stride; images image_fps) is
    embedded like the timestep and added to it (DiTConfig.fps_conditioning)."""
    image_fps: float = 120.0
    """The frame rate images are given under fps_conditioning (Open-Sora's IMG_FPS)."""

    def __post_init__(self) -> None:
        if self.preset not in DIT_PRESETS:
            raise ValueError(f"[model] preset: expected one of {sorted(DIT_PRESETS)}, got {self.preset!r}")
        attentions = ("full", *(f"latte_{v}" for v in LATTE_VARIANTS))
        if self.attention not in attentions:
            raise ValueError(f"[model] attention: expected one of {attentions}, got {self.attention!r}")
        if self.image_fps <= 0:
            raise ValueError(f"[model] image_fps: expected > 0, got {self.image_fps}")

    def build(self, dit_cfg: DiTConfig) -> nn.Module:
        """The DiT of ``dit_cfg``, or the Latte variant of the same sizes."""
        if self.attention == "full":
            return DiT(dit_cfg)
        return Latte(latte_from_dit(dit_cfg, self.attention.removeprefix("latte_")))

    def dit(self, *, text_dim: int, text_len: int, latent_channels: int) -> DiTConfig:
        """The preset, its widths fitted to the text encoder (T5-XXL: 4096) and the VAE's latent channels."""
        extra = {"pos_embed": self.pos_embed} if self.pos_embed else {}
        return dit_config(self.preset, checkpointing=self.checkpointing, text_dim=text_dim, max_text_len=text_len,
                          in_channels=latent_channels, out_channels=latent_channels,
                          fps_conditioning=self.fps_conditioning, **extra)


@dataclass(frozen=True, kw_only=True, slots=True)
class VAESection:
    checkpoint: str = ""
    """A VAE stage's run folder (its latest checkpoint) or checkpoint folder; frozen, eval mode."""
    weights: str = "ema"
    """Which of its weights: "ema" or "model"."""
    scale_batches: int = 0
    """When neither data.latent_scale, the VAE checkpoint's latent_scale.json nor the ``init_from`` stage's
    checkpoint gives the latent scale, measure it (1/std of posterior samples) over this many training
    batches; 0 = stop with an error."""

    def __post_init__(self) -> None:
        if self.weights not in ("ema", "model"):
            raise ValueError(f"[vae] weights: expected 'ema' or 'model', got {self.weights!r}")
        if self.scale_batches < 0:
            raise ValueError(f"[vae] scale_batches: expected >= 0, got {self.scale_batches}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DiffusionSection:
    schedule: str = "2b"
    """A key of trainer.diffusion.SCHEDULE_PRESETS (the 2B's SNR shift 3.0, the 5B's 1.0, tiny 1.0)."""
    snr_shift_scale: float = 0.0
    """Overrides the preset's SNR shift when > 0."""
    timestep_bins: int = 5
    """Slices of [0, 1000) the loss is also logged by (loss_t000_199, ...)."""
    p_motion_free: float = 0.0
    """GenTron: each sample is trained motion-free (its frames do not see each other) with this
    probability, drawn per (seed, step, rank); sample with [sample] motion_guidance. 0 = off."""
    pseudo_video_frames: int = 0
    """GenTron's joint image-video scheme: image batches become static pseudo-videos of this many latent
    frames (the image repeated), always motion-free. 0 = images stay single frames."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULE_PRESETS:
            raise ValueError(f"[diffusion] schedule: expected one of {sorted(SCHEDULE_PRESETS)}, got {self.schedule!r}")
        if not 0.0 <= self.p_motion_free <= 1.0 or self.pseudo_video_frames < 0:
            raise ValueError(f"[diffusion]: expected 0 <= p_motion_free <= 1 and pseudo_video_frames >= 0, got "
                             f"{self.p_motion_free} and {self.pseudo_video_frames}")
        if self.snr_shift_scale < 0 or not 1 <= self.timestep_bins <= 100:
            raise ValueError(f"[diffusion]: expected snr_shift_scale >= 0 and 1 <= timestep_bins <= 100, got "
                             f"{self.snr_shift_scale} and {self.timestep_bins}")

    def schedule_config(self) -> ScheduleConfig:
        base = SCHEDULE_PRESETS[self.schedule]
        return dataclasses.replace(base, snr_shift_scale=self.snr_shift_scale) if self.snr_shift_scale > 0 else base


@dataclass(frozen=True, kw_only=True, slots=True)
class DiTTrainConfig:
    steps: int = 1000
    """Total optimizer steps of this stage (a resumed run continues up to this)."""
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    """Checkpoint every N steps (a multiple of log_every); the last step always checkpoints."""
    sample_every: int = 500
    """EMA sample videos beside the checkpoint every N steps (a multiple of ckpt_every) and at the end."""
    ema_decay: float = 0.999
    strategy: str = "ddp"
    """Data parallelism: "ddp" or "fsdp" (FSDP2 fully_shard per transformer block)."""
    precision: str = "auto"
    """"auto" = bf16 autocast on CUDA, fp32 on CPU; "fp32" everywhere."""
    init_from: str = ""
    """The previous stage's run or checkpoint folder whose EMA weights start this stage (e.g. the
    256-px run for the 512-px stage). Ignored when resuming this stage's own run."""

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "ckpt_every", "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"[train] {name}: expected >= 1, got {getattr(self, name)}")
        for name, base in (("ckpt_every", "log_every"), ("sample_every", "ckpt_every")):
            if getattr(self, name) % getattr(self, base):
                raise ValueError(f"[train] {name}={getattr(self, name)} must be a multiple of {base}={getattr(self, base)}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"[train] strategy: expected 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.precision not in ("auto", "fp32"):
            raise ValueError(f"[train] precision: expected 'auto' or 'fp32', got {self.precision!r}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"[train] ema_decay: expected a value in [0, 1], got {self.ema_decay}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StandinSection:
    text: bool = False
    """Build the tiny random stand-in T5 (trainer.standins) in the folder [text] model names when that
    folder does not exist yet, for sample-sized runs without real weights; it is named a stand-in in
    every log line and checkpoint."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DiTStageConfig:
    stage: StageConfig = StageConfig(kind="dit")
    model: ModelSection = ModelSection()
    vae: VAESection = VAESection()
    text: TextConfig = TextConfig()
    data: DiTDataConfig = DiTDataConfig()
    diffusion: DiffusionSection = DiffusionSection()
    optim: AdamWConfig = AdamWConfig()
    train: DiTTrainConfig = DiTTrainConfig()
    sample: SampleConfig = SampleConfig()
    standins: StandinSection = StandinSection()
    ray: RayConfig = RayConfig(name="dit")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data.root", "vae.checkpoint", "train.init_from", "ray.storage_path")
    """Dotted fields holding paths; jobs/train.py makes them absolute before handing the config to workers.
    ``text.model`` may be a hub id, so config_from_dict makes it absolute only when it names a local folder."""

    def __post_init__(self) -> None:
        if self.stage.kind != "dit":
            raise ValueError(f"DiTStageConfig: expected [stage] kind = 'dit', got {self.stage.kind!r}")
        if not self.vae.checkpoint:
            raise ValueError("[vae] checkpoint: expected the VAE stage's run or checkpoint folder, got an empty string")
        if self.optim.schedule == "cosine" and self.train.steps <= self.optim.warmup_steps:
            raise ValueError(f"[optim] warmup_steps={self.optim.warmup_steps} must be below [train] steps="
                             f"{self.train.steps} for the cosine schedule (or set schedule = 'constant')")

    def sample_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the sample videos: [sample] where set, else the first video bucket's."""
        videos = [parse_bucket(b) for b in self.data.buckets if parse_bucket(b)[0] > 1]
        f, h, w = videos[0] if videos else (parse_bucket(self.data.buckets[0]) if self.data.buckets else (1, 0, 0))
        s = self.sample
        return s.frames or f, s.height or h, s.width or w


def config_from_dict(data: dict[str, Any]) -> DiTStageConfig:
    """The stage from a parsed TOML (or ``dataclasses.asdict`` of one); unknown keys raise naming them."""
    data = dict(data)
    text = dict(data.get("text", {}))
    standin = bool(data.get("standins", {}).get("text", False))
    if text.get("model") and (standin or Path(str(text["model"])).expanduser().is_dir()):
        text["model"] = str(Path(str(text["model"])).expanduser().resolve())  # workers run elsewhere
        data["text"] = text
    return from_dict(DiTStageConfig, data, where="dit stage")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (lives in the package so workers can import it)."""
    run_worker(config, config_from_dict, main)


# ---------------------------------------------------------------------------------------------
# One step's inputs and loss
# ---------------------------------------------------------------------------------------------


def noise_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator of one step's diffusion noise on one rank (a resumed run draws the same)."""
    digest = hashlib.sha256(f"diffusion-noise:{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def vision_tokens(cfg: DiTConfig, latent_shape: tuple[int, ...]) -> int:
    """Vision tokens of one sample of DiT latents (B, t, C, h, w)."""
    _, t, _, h, w = latent_shape
    return (t // (cfg.patch_size_t or 1)) * (h // cfg.patch_size) * (w // cfg.patch_size)


def bin_names(num_bins: int, num_train_timesteps: int) -> list[str]:
    edges = [i * num_train_timesteps // num_bins for i in range(num_bins + 1)]
    return [f"loss_t{edges[i]:03d}_{edges[i + 1] - 1:03d}" for i in range(num_bins)]


def per_sample_loss(model: nn.Module, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    ac: torch.Tensor, autocast: Any, **cond: torch.Tensor) -> torch.Tensor:
    """(B,) x0-weighted diffusion loss of v predicted at x_t = q_sample(x0, noise, t). x0, noise: (B, t, C, h, w).
    ``cond``: the model's optional per-sample inputs (``motion_free``, ``fps``)."""
    x_t = q_sample(x0, noise, t, ac)
    with autocast:
        v = model(x_t, text, t, **cond)  # (B, t, C, h, w)
    return diffusion_loss(v.float(), x0, noise, t, ac)


@torch.no_grad()
def fixed_eval_loss(model: nn.Module, x0: torch.Tensor, text: torch.Tensor, ac: torch.Tensor, *,
                    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), seed: int = 0,
                    **cond: torch.Tensor) -> torch.Tensor:
    """(B,) loss of each sample averaged over fixed timesteps with fixed noise: comparable across
    models, captions and conditions (CogVideoX's Table 9 evaluates at t = 100 ... 900). ``cond``: the
    model's optional per-sample inputs, as for ``per_sample_loss``."""
    was_training = model.training
    model.eval()
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for k, t in enumerate(timesteps):
        noise = torch.randn(x0.shape, generator=noise_generator(seed, -1 - k, 0)).to(x0.device)
        tt = torch.full((x0.shape[0],), t, dtype=torch.int64, device=x0.device)
        total += per_sample_loss(model, x0, text, tt, noise, ac, contextlib.nullcontext(), **cond).double().cpu()
    model.train(was_training)
    return (total / len(timesteps)).float()


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def main(cfg: DiTStageConfig, run: RunContext) -> list[dict[str, float]]:
    """Train one DiT stage to ``cfg.train.steps``, resuming from the run's latest checkpoint."""
    tc, device = cfg.train, run.device
    # Bad data fails here, before any model is built or loaded.
    counts = check_data(cfg.data)
    if run.rank == 0:
        print(f"[dit] data {cfg.data.root}: " + ", ".join(f"{b} {n} samples" for b, n in counts.items()))

    # Frozen encoders: the VAE (latents in, sample videos out) and T5.
    vae, vae_folder = load_vae(cfg.vae.checkpoint, cfg.vae.weights, device)
    if cfg.standins.text:
        if run.rank == 0 and not Path(cfg.text.model).is_dir():
            build_t5_standin(cfg.text.model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the other ranks load it once rank 0 has renamed it into place
    encoder = TextEncoder(cfg.text, device)
    schedule_cfg = cfg.diffusion.schedule_config()
    ac = alphas_cumprod(schedule_cfg).to(device)

    # The DiT: the same initial weights on every rank (FSDP2 does not broadcast them).
    dit_cfg = cfg.model.dit(text_dim=encoder.dim, text_len=cfg.text.max_length, latent_channels=vae.cfg.latent_channels)
    seed_everything(tc.seed)
    model = cfg.model.build(dit_cfg).to(device)
    seed_everything(rank_seed(tc.seed, run.rank))

    # Where to start: this run's latest checkpoint, else the previous stage's EMA weights, else scratch.
    start_step, data_state, init_state = 0, {}, None
    resume = find_resume(run)
    if resume is not None:
        model.load_state_dict(resume.state["model"])
        start_step, data_state = resume.step, dict(resume.state["data_position"])
        print(f"[rank {run.rank}] resuming from {resume.folder} at step {start_step}")
    elif tc.init_from:
        init, init_state = load_init(tc.init_from)
        model.load_state_dict(init_state["ema"])
        print(f"[rank {run.rank}] initialised from {init} (EMA weights of step {init_state['step']})")
    ema = EMA(model, tc.ema_decay)
    if resume is not None:
        ema.load_state_dict(resume.state["ema"])

    # Data parallelism (FSDP2 shard units: the transformer blocks), AdamW, warm-up then cosine.
    blocks = (Block, SpatialBlock, TemporalBlock, FactorisedAttentionBlock, FactorisedHeadsBlock)
    model = wrap(model, tc.strategy, device, run.world_size, shard_units=blocks)
    opt = cfg.optim.optimizer(model.parameters())
    if resume is not None:
        load_optimizer_state(model, opt, resume.state["opt"])
    schedule = cfg.optim.lr_schedule(tc.steps)

    # Data, latent scale, caption dropout.
    factors = {"spatial_factor": vae.cfg.spatial_factor, "temporal_factor": vae.cfg.temporal_factor}
    if resume is not None:
        scale = float(resume.state["latent_scale"])  # never changes within a run
    else:
        scale = latent_scale(cfg, vae, vae_folder, device, factors, init_state)
    batches = DiTBatches(cfg.data, seed=tc.seed, rank=run.rank, world_size=run.world_size, state=data_state, **factors)
    dropout = CaptionDropout.from_encoder(encoder, seed=tc.seed)
    autocast = autocast_for(device, tc.precision)
    peak = peak_flops(device)
    names = bin_names(cfg.diffusion.timestep_bins, schedule_cfg.num_train_timesteps)
    if run.rank == 0:
        print(f"[dit] {cfg.model.preset} DiT ({sum(p.numel() for p in ema.module.parameters()):,} parameters), "
              f"text {encoder.describe()}, VAE {vae_folder}, latent scale {scale:.5f}, steps {start_step}->{tc.steps}")
    restore_rng(resume)  # last, so nothing above consumes the restored stream

    # Loop.
    model.train()
    window = MetricWindow()
    stream = iter(batches)
    try:
        for step in range(start_step + 1, tc.steps + 1):
            set_lr(opt, schedule(step))
            batch = next(stream)
            x0 = batch_latents(batch, scale=scale, vae=vae, generator=posterior_generator(tc.seed, step, run.rank),
                               device=device).permute(0, 2, 1, 3, 4)  # (B, C, t, h, w) -> (B, t, C, h, w)
            emb, mask = batch_text(batch, encoder=encoder, device=device)  # (B, L, D), (B, L)
            emb, _, dropped = dropout(emb, mask, step=step, rank=run.rank)
            b = x0.shape[0]
            t = stratified_timesteps(step=step, seed=tc.seed, rank=run.rank, world_size=run.world_size,
                                     local_batch=b, num_train_timesteps=schedule_cfg.num_train_timesteps).to(device)
            cond = step_conditioning(cfg, batch, step=step, rank=run.rank, batch_size=b, device=device)
            if cfg.diffusion.pseudo_video_frames and x0.shape[1] == 1:  # GenTron: a still as a static video
                x0 = x0.expand(-1, cfg.diffusion.pseudo_video_frames, -1, -1, -1).contiguous()
                cond["motion_free"] = torch.ones(b, dtype=torch.bool, device=device)
            noise = torch.randn(x0.shape, generator=noise_generator(tc.seed, step, run.rank)).to(device)

            losses = per_sample_loss(model, x0, emb.float(), t, noise, ac, autocast, **cond)  # (B,)
            loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            parts = {"loss": float(loss.detach()), f"loss_{batch['kind']}": float(loss.detach())}
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                parts["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: DTensor
            opt.step()
            ema.update(model)

            bins = timestep_bins(t, len(names), schedule_cfg.num_train_timesteps).cpu()
            detached = losses.detach().cpu()
            for k in bins.unique().tolist():
                parts[names[k]] = float(detached[bins == k].mean())
            seq = emb.shape[1] + vision_tokens(dit_cfg, tuple(x0.shape))  # text + vision tokens per sample
            parts["caption_dropped_fraction"] = float(dropped.float().mean())
            window.add(parts, samples=b, tokens=b * seq,
                       flops=b * sample_flops(cfg, dit_cfg, tuple(x0.shape), emb.shape[1]))

            last = step == tc.steps
            if step % tc.log_every and not last:
                continue
            metrics = window.reduce(device)
            flops_per_s = metrics.pop("flops_per_s")
            metrics |= data_metrics(batches, device)
            metrics |= {"step": step, "lr": schedule(step), "bucket_frames": parse_bucket(batch["bucket"])[0],
                        "latent_scale": scale}
            if peak is not None:
                metrics["mfu_percent"] = 100.0 * flops_per_s / (peak * run.world_size)
            if run.rank == 0:
                print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))

            if step % tc.ckpt_every == 0 or last:
                # Collective under FSDP: every rank gathers, rank 0 keeps the full dicts.
                state = {
                    "model": model_state(model), "opt": optimizer_state(model, opt), "ema": ema.state_dict(),
                    "step": step, "data_position": batches.state_dict(), "config": dataclasses.asdict(cfg),
                    "dit_config": dataclasses.asdict(dit_cfg), "schedule": dataclasses.asdict(schedule_cfg),
                    "text_encoder": encoder.record(), "latent_scale": scale, "vae_checkpoint": str(vae_folder),
                }
                sampled = bool(cfg.sample.prompts) and (step % tc.sample_every == 0 or last)
                extras = None
                if sampled:
                    def extras(folder: Path, step: int = step) -> None:
                        write_stage_samples(folder, step, cfg, Sampler(ema.module, vae, encoder, schedule_cfg, scale,
                                                                        device, tc.precision))
                save_and_report(run, step, metrics, state, extras=extras)
            else:
                run.report(metrics, None)
    finally:
        stream.close()  # stops the DataLoader workers
    return getattr(run, "history", [])


def latent_scale(cfg: DiTStageConfig, vae: nn.Module, vae_folder: Path, device: torch.device,
                 factors: dict[str, int], init_state: dict[str, Any] | None = None) -> float:
    """data.latent_scale, else the VAE checkpoint's, else the one the ``init_from`` stage trained with (a stage
    that continues another's weights must see latents at the same scale), else (vae.scale_batches > 0) 1/std
    of the posterior samples of the first training batches of rank 0's stream (pixels through the VAE, or
    precomputed moments), the same value on every rank."""
    try:
        return resolve_latent_scale(cfg.data.latent_scale, vae_folder)
    except FileNotFoundError:
        if init_state is not None and "latent_scale" in init_state:
            print(f"[dit] latent scale {float(init_state['latent_scale']):.5f} from {cfg.train.init_from} "
                  "(the stage it starts from)")
            return float(init_state["latent_scale"])
        if cfg.vae.scale_batches == 0:
            raise
    probe = DiTBatches(dataclasses.replace(cfg.data, num_workers=0), seed=cfg.train.seed, **factors)
    total, total_sq, count = 0.0, 0.0, 0
    for k, batch in zip(range(cfg.vae.scale_batches), probe):
        z = batch_latents(batch, scale=1.0, vae=vae, generator=posterior_generator(cfg.train.seed, -1 - k, 0),
                          device=device).double()  # (B, C, t, h, w)
        total, total_sq, count = total + float(z.sum()), total_sq + float((z * z).sum()), count + z.numel()
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    if std == 0.0:
        raise ValueError(f"latent scale: the VAE {vae_folder} gives latents with zero spread; expected a trained VAE")
    print(f"[dit] measured latent scale {1.0 / std:.5f} (1/std over {cfg.vae.scale_batches} batches; "
          f"set [data] latent_scale to fix it)")
    return 1.0 / std


def step_conditioning(cfg: DiTStageConfig, batch: dict[str, Any], *, step: int, rank: int, batch_size: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """The optional model inputs of one step: GenTron's motion-free switch (seeded per step and rank) and
    the clips' frame rates (images, fps 0 in the shards, get [model] image_fps)."""
    cond: dict[str, torch.Tensor] = {}
    if cfg.diffusion.p_motion_free > 0:
        cond["motion_free"] = motion_free_draw(step=step, seed=cfg.train.seed, rank=rank, batch=batch_size,
                                               p=cfg.diffusion.p_motion_free).to(device)
    if cfg.model.fps_conditioning:
        fps = batch["fps"].float()  # (B,)
        cond["fps"] = torch.where(fps > 0, fps, torch.full_like(fps, cfg.model.image_fps)).to(device)
    return cond


def sample_flops(cfg: DiTStageConfig, dit_cfg: DiTConfig, latent_shape: tuple[int, ...], n_text: int) -> float:
    """Training flops of one sample of DiT latents (B, t, C, h, w) for the configured attention."""
    _, t, _, h, w = latent_shape
    if cfg.model.attention == "full":
        seq = n_text + vision_tokens(dit_cfg, latent_shape)
        return seq * flops_per_token(dit_cfg, seq)
    latte = latte_from_dit(dit_cfg, cfg.model.attention.removeprefix("latte_"))
    return latte_flops(latte, t, h // dit_cfg.patch_size, w // dit_cfg.patch_size, n_text)


def write_stage_samples(folder: Path, step: int, cfg: DiTStageConfig, sampler: Sampler) -> None:
    """The EMA model's videos for the fixed prompts, beside the checkpoint (rank 0)."""
    s = cfg.sample
    frames, height, width = cfg.sample_shape()
    videos = sampler.generate(list(s.prompts), frames=frames, height=height, width=width, steps=s.steps,
                              guidance_scale=s.guidance_scale, seed=s.seed, guidance=s.guidance_config(), fps=s.fps)
    write_samples(folder, step, videos, list(s.prompts), fps=s.fps,
                  info={"steps": s.steps, "guidance_scale": s.guidance_scale, "seed": s.seed, "weights": "ema",
                        "text_encoder": sampler.encoder.describe()})


__all__ = [
    "DiTStageConfig", "DiTTrainConfig", "DiffusionSection", "LocalRun", "ModelSection", "VAESection",
    "config_from_dict", "fixed_eval_loss", "main", "noise_generator", "per_sample_loss", "train_loop_per_worker",
]
