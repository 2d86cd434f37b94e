"""VAE training stage: ``main(cfg, run)`` reads top to bottom; Ray Train calls it on every worker.

One stage of the two-stage CogVideoX recipe (17 frames at 256x256 with images, then 161 frames
initialised from stage 1) is one TOML config (jobs/configs/vae_stage{1,2}.toml). The same loop runs
in a single process (``LocalRun``, used by tests and quick experiments) and on Ray Train
(``RayRun``, one process per GPU or CPU worker, DDP or FSDP2).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    model_state,
    optimizer_state,
    save_checkpoint,
    set_rng_state,
    write_video,
)
from trainer.config import OptimConfig, VAEStageConfig, stage_config_from_dict, stage_config_to_dict
from trainer.data import BucketBatches, heldout_clips, to_uint8
from trainer.losses import (
    LossConfig,
    PatchDiscriminator3D,
    adaptive_weight,
    d_hinge_loss,
    g_hinge_loss,
    kl_loss,
    load_perceptual,
    random_frames,
    recon_loss,
    time_window,
)
from trainer.models.vae import CausalVAE, VAEResBlock, psnr

# ---------------------------------------------------------------------------------------------
# Where the loop runs: a single process or a Ray Train worker
# ---------------------------------------------------------------------------------------------


class RunContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> Path | None: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


@dataclass
class LocalRun:
    """One process, no Ray: checkpoints go to ``out_dir/checkpoint_NNNNNN``; metrics are kept in memory
    and appended to ``out_dir/metrics.jsonl``."""

    out_dir: Path
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    history: list[dict[str, float]] = field(default_factory=list)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint_dir is not None:
            target = self.out_dir / f"checkpoint_{int(metrics['step']):06d}"
            target.mkdir(exist_ok=True)
            for f in checkpoint_dir.iterdir():
                f.replace(target / f.name)
        self.history.append(metrics)
        with (self.out_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")


class RayRun:
    """Inside a Ray Train worker: rank/device from the train context, reporting via ray.train.report."""

    def __init__(self, resume_from: str = "") -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._latest = ray.train.get_checkpoint()
        self._resume_from = Path(resume_from) if resume_from else None

    def latest_checkpoint(self) -> Path | None:
        if self._latest is None:
            return self._resume_from
        # Local storage: the checkpoint path is readable in place from every worker on this node.
        path = Path(self._latest.path)
        if path.is_dir():
            return path
        local = Path(tempfile.mkdtemp(prefix="vae_resume_"))
        self._latest.to_directory(str(local))
        return local

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (lives in the package so workers can import it)."""
    config = dict(config)
    torch.set_num_threads(max(1, int(config.pop("_threads_per_worker", 1))))
    resume_from = config.pop("_resume_from", "")
    main(stage_config_from_dict(config), RayRun(resume_from))


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, oc: OptimConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then constant."""
    if oc.warmup_steps and step <= oc.warmup_steps:
        return oc.lr * step / oc.warmup_steps
    return oc.lr


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
        e.lerp_(full.detach().to(e.dtype), 1.0 - decay)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def wrap(model: nn.Module, strategy: str, device: torch.device, world_size: int) -> nn.Module:
    """DDP, or FSDP2 with each residual block its own shard unit; unchanged in a single process."""
    if world_size == 1:
        return model
    if strategy == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, VAEResBlock):
            fully_shard(module)
    fully_shard(model)
    return model


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; fp32 on CPU, where bf16 is slower (DESIGN.md section 6)."""
    if device.type == "cuda" and precision == "auto":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# One optimisation step
# ---------------------------------------------------------------------------------------------


def train_step(
    model: nn.Module, disc: nn.Module, perceptual: nn.Module | None,
    opt: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
    x: torch.Tensor, step: int, lc: LossConfig, grad_clip: float, autocast: contextlib.AbstractContextManager,
) -> dict[str, float]:
    """Autoencoder update, then (from ``disc_start``) a discriminator update. x: (B, 3, T, H, W)."""
    gan_on = step >= lc.disc_start
    with autocast:
        recon, mean, logvar = model(x)  # (B, 3, T, H, W), (B, 16, T', h, w) x 2
    recon = recon.float()
    rec = recon_loss(x, recon, lc.recon)
    nll = rec
    parts: dict[str, torch.Tensor] = {"loss_rec": rec.detach()}
    if perceptual is not None:
        fr, fx = random_frames(recon, x)  # (B, 3, H, W) each
        perc = perceptual(fr, fx)
        nll = nll + lc.perceptual_weight * perc
        parts["loss_perceptual"] = perc.detach()
    kl = kl_loss(mean, logvar)
    # KL is a per-sample sum; dividing by the pixels per sample keeps the taming/CogVideoX ratio
    # between summed reconstruction error and kl_weight * KL while recon is a per-pixel mean.
    loss = nll + lc.kl_weight * kl / x[0].numel()
    parts["loss_kl"] = kl.detach()

    window = min(lc.disc_frames, x.shape[2])
    start = int(torch.randint(0, x.shape[2] - window + 1, ()).item()) if gan_on else 0
    if gan_on:
        with autocast:
            # The raw discriminator: its grads here are discarded, so no DDP all-reduce is wasted on them.
            logits_fake = unwrap(disc)(time_window(recon, window, start))
        g_loss = g_hinge_loss(logits_fake)
        at = unwrap(model).last_layer if lc.adaptive_weight_on == "last_layer" else recon
        d_weight = adaptive_weight(nll, g_loss, at) * lc.disc_weight
        loss = loss + d_weight * g_loss
        parts["loss_g"] = g_loss.detach()
        parts["d_weight"] = d_weight.detach()

    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    opt.step()
    parts["loss"] = loss.detach()

    if gan_on:
        opt_d.zero_grad(set_to_none=True)
        pair = torch.cat([time_window(x, window, start), time_window(recon.detach(), window, start)])
        with autocast:
            logits = disc(pair)  # one forward for real and fake: DDP expects one forward per backward
        logits_real, logits_fake = logits.chunk(2)
        d_loss = d_hinge_loss(logits_real, logits_fake)
        d_loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(disc.parameters(), grad_clip)
        opt_d.step()
        parts["loss_d"] = d_loss.detach()
        parts["logits_real"] = logits_real.detach().float().mean()
        parts["logits_fake"] = logits_fake.detach().float().mean()
    return {k: float(v) for k, v in parts.items()}


@torch.no_grad()
def evaluate_psnr(model: nn.Module, clips: list[torch.Tensor], total: int, run: RunContext,
                  autocast: contextlib.AbstractContextManager) -> float:
    """Mean held-out PSNR (posterior mean, no sampling) over all ranks' clips.

    Every rank runs the same number of forwards (padding with a zero-weight repeat) because an
    FSDP forward is a collective.
    """
    per_rank = math.ceil(total / run.world_size)
    was_training = model.training
    model.eval()
    total_db, count = 0.0, 0.0
    for i in range(per_rank):
        real = i < len(clips)
        clip = clips[i] if real else clips[0] if clips else None
        if clip is None:
            raise ValueError(f"rank {run.rank} has no held-out clips; expected >= {run.world_size} held-out samples")
        x = clip[None].to(run.device)
        with autocast:
            recon, _, _ = model(x, sample=False)
        if real:
            total_db += float(psnr(recon.float(), x).sum())
            count += 1
    model.train(was_training)
    total_db, count = all_reduce_sum([total_db, count], run.device)
    return total_db / max(count, 1.0)


@torch.no_grad()
def write_recon(folder: Path, ema: nn.Module, clips: list[torch.Tensor], step: int, device: torch.device) -> None:
    """Original | EMA reconstruction, side by side, one mp4 per clip (at most 2)."""
    for i, clip in enumerate(clips[:2]):
        recon, _, _ = ema(clip[None].to(device), sample=False)
        both = torch.cat([clip.to(device), recon[0].float()], dim=-1)  # (3, T, H, 2W)
        write_video(folder / f"recon_step{step:06d}_{i}.mp4", to_uint8(both))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def main(cfg: VAEStageConfig, run: RunContext) -> list[dict[str, float]]:
    """Train one VAE stage to ``cfg.train.steps``, resuming from the run's latest checkpoint."""
    tc = cfg.train
    seed_everything(tc.seed * 1000 + run.rank)
    device = run.device

    # Model, EMA, discriminator, perceptual loss.
    model = CausalVAE(cfg.model.vae()).to(device)
    disc = PatchDiscriminator3D(channels=cfg.loss.disc_channels, layers=cfg.loss.disc_layers).to(device)
    perceptual = load_perceptual(cfg.loss.perceptual_weights)
    if perceptual is not None:
        perceptual = perceptual.to(device)

    # Where to start: this run's latest checkpoint, else the previous stage's weights, else scratch.
    start_step, position, resume, rng = 0, {}, None, None
    ckpt = run.latest_checkpoint()
    if ckpt is not None:
        resume, rng = load_checkpoint(ckpt, rank=run.rank)
        model.load_state_dict(resume["model"])
        disc.load_state_dict(resume["disc"])
        start_step, position = int(resume["step"]), dict(resume["data_position"])
        print(f"[rank {run.rank}] resuming from {ckpt} at step {start_step}")
    elif tc.init_from:
        init = latest_checkpoint(tc.init_from)
        if init is None:
            raise FileNotFoundError(f"train.init_from: expected a checkpoint under {tc.init_from}, found none")
        init_state, _ = load_checkpoint(init, rank=0)
        model.load_state_dict(init_state["ema"])
        disc.load_state_dict(init_state["disc"])
        print(f"[rank {run.rank}] initialised from {init} (EMA weights of step {init_state['step']})")
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if resume is not None:
        ema.load_state_dict(resume["ema"])

    model = wrap(model, tc.strategy, device, run.world_size)
    disc = wrap(disc, tc.strategy, device, run.world_size)
    oc = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=oc.disc_lr, betas=oc.betas, weight_decay=oc.weight_decay)
    if resume is not None:
        load_optimizer_state(model, opt, resume["opt"])
        load_optimizer_state(disc, opt_d, resume["opt_d"])
    if rng is not None:
        set_rng_state(rng)  # last, so nothing above consumes the restored stream

    # Data.
    batches = BucketBatches(cfg.data, seed=tc.seed, rank=run.rank, world_size=run.world_size, position=position)
    heldout = heldout_clips(cfg.data, rank=run.rank, world_size=run.world_size)
    heldout_total = min(cfg.data.heldout_samples, len(heldout) * run.world_size) if heldout else 0
    autocast = autocast_for(device, tc.precision)

    # Loop.
    model.train()
    sums: dict[str, float] = {}
    n_steps, n_samples, n_frames, t_last = 0, 0, 0, time.perf_counter()
    for step in range(start_step + 1, tc.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, oc)
        bucket, x = batches.batch(step)
        x = x.to(device, non_blocking=True)
        parts = train_step(model, disc, perceptual, opt, opt_d, x, step, cfg.loss, oc.grad_clip, autocast)
        update_ema(ema, model, tc.ema_decay)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps, n_samples, n_frames = n_steps + 1, n_samples + x.shape[0], n_frames + x.shape[0] * x.shape[2]

        last = step == tc.steps
        if step % tc.log_every and not last:
            continue
        keys = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in keys] + [n_samples, n_frames], device)
        elapsed = time.perf_counter() - t_last
        metrics = {k: v / (n_steps * run.world_size) for k, v in zip(keys, reduced[:-2], strict=True)}
        metrics |= {"step": step, "lr": lr_at(step, oc), "bucket_frames": x.shape[2],
                    "samples_per_s": reduced[-2] / elapsed, "frames_per_s": reduced[-1] / elapsed,
                    "step_time_s": elapsed / n_steps}
        if heldout and (step % tc.eval_every == 0 or last):
            metrics["heldout_psnr"] = evaluate_psnr(model, heldout, heldout_total, run, autocast)
            metrics["heldout_psnr_ema"] = evaluate_psnr(ema, heldout, heldout_total, run, autocast)
        if run.rank == 0:
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))

        if step % tc.ckpt_every == 0 or last:
            # Collective under FSDP: every rank gathers, rank 0 keeps the full dicts.
            state = {
                "model": model_state(model), "disc": model_state(disc),
                "opt": optimizer_state(model, opt), "opt_d": optimizer_state(disc, opt_d),
                "ema": ema.state_dict(), "step": step, "data_position": dict(batches.position),
                "config": stage_config_to_dict(cfg),
            }
            with tempfile.TemporaryDirectory(prefix="vae_ckpt_") as tmp:
                folder = save_checkpoint(tmp, rank=run.rank, step=step, state=state if run.rank == 0 else None)
                if run.rank == 0 and step % tc.recon_every == 0 and heldout:
                    write_recon(folder, ema, heldout, step, device)
                run.report(metrics, folder)
        else:
            run.report(metrics, None)
        sums, n_steps, n_samples, n_frames, t_last = {}, 0, 0, 0, time.perf_counter()
    return getattr(run, "history", [])


def iter_metrics(path: str | Path) -> Iterator[dict[str, float]]:
    """Metrics a LocalRun wrote, one dict per report."""
    with Path(path).open() as fh:
        for line in fh:
            yield json.loads(line)
