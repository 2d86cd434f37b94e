"""VAE training stage: ``main(cfg, run)`` reads top to bottom; Ray Train calls it on every worker.

One stage of the two-stage CogVideoX recipe (17 frames at 256x256 with images, then 161 frames
initialised from stage 1) is one TOML config (jobs/configs/vae_stage{1,2}.toml). The same loop runs
in a single process (``LocalRun``, used by tests and quick experiments) and on Ray Train
(``RayRun``, one process per GPU or CPU worker, DDP or FSDP2). What is not VAE-specific (run
contexts, wrapping, EMA, schedule, precision, seeds, reduction, checkpoint cycle) is trainer/runtime.py.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import write_video
from trainer.config import VAEStageConfig, stage_config_to_dict
from trainer.config import stage_config_from_dict as config_from_dict
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
from trainer.metrics import MetricWindow, data_metrics
from trainer.models.vae import CausalVAE, VAEResBlock, psnr
from trainer.runtime import (
    EMA,
    LocalRun,
    LRSchedule,
    RunContext,
    autocast_for,
    find_resume,
    load_init,
    load_optimizer_state,
    model_state,
    optimizer_state,
    rank_seed,
    reduce_sum,
    restore_rng,
    run_worker,
    save_and_report,
    seed_everything,
    set_lr,
    unwrap,
    wrap,
)

__all__ = ["LocalRun", "autocast_for", "config_from_dict", "evaluate_psnr", "iter_metrics", "main",
           "train_loop_per_worker", "train_step"]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (lives in the package so workers can import it)."""
    run_worker(config, config_from_dict, main)


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
    total_db, count = reduce_sum([total_db, count], run.device)
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
    tc, oc = cfg.train, cfg.optim
    seed_everything(rank_seed(tc.seed, run.rank))
    device = run.device

    # Model, discriminator, perceptual loss.
    model = CausalVAE(cfg.model.vae()).to(device)
    disc = PatchDiscriminator3D(channels=cfg.loss.disc_channels, layers=cfg.loss.disc_layers).to(device)
    perceptual = load_perceptual(cfg.loss.perceptual_weights)
    if perceptual is not None:
        perceptual = perceptual.to(device)

    # Where to start: this run's latest checkpoint, else the previous stage's EMA weights, else scratch.
    start_step, position, budget = 0, {}, {}
    resume = find_resume(run)
    if resume is not None:
        model.load_state_dict(resume.state["model"])
        disc.load_state_dict(resume.state["disc"])
        start_step, position = resume.step, dict(resume.state["data_position"])
        budget = dict(resume.state.get("data_budget", {}))  # bad samples skipped so far (older checkpoints: none)
        print(f"[rank {run.rank}] resuming from {resume.folder} at step {start_step}")
    elif tc.init_from:
        init, init_state = load_init(tc.init_from)
        model.load_state_dict(init_state["ema"])
        disc.load_state_dict(init_state["disc"])
        print(f"[rank {run.rank}] initialised from {init} (EMA weights of step {init_state['step']})")
    ema = EMA(model, tc.ema_decay)
    if resume is not None:
        ema.load_state_dict(resume.state["ema"])

    # Data parallelism (FSDP2 shard units: the residual blocks) and optimizers.
    model = wrap(model, tc.strategy, device, run.world_size, shard_units=(VAEResBlock,))
    disc = wrap(disc, tc.strategy, device, run.world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=oc.disc_lr, betas=oc.betas, weight_decay=oc.weight_decay)
    if resume is not None:
        load_optimizer_state(model, opt, resume.state["opt"])
        load_optimizer_state(disc, opt_d, resume.state["opt_d"])

    # Data.
    batches = BucketBatches(cfg.data, seed=tc.seed, rank=run.rank, world_size=run.world_size, position=position,
                            budget=budget)
    heldout = heldout_clips(cfg.data, rank=run.rank, world_size=run.world_size)
    heldout_total = min(cfg.data.heldout_samples, len(heldout) * run.world_size) if heldout else 0
    autocast = autocast_for(device, tc.precision)
    schedule = LRSchedule(peak=oc.lr, warmup_steps=oc.warmup_steps)
    restore_rng(resume)  # last, so nothing above consumes the restored stream

    # Loop.
    model.train()
    window = MetricWindow()
    for step in range(start_step + 1, tc.steps + 1):
        set_lr(opt, schedule(step))
        _, x = batches.batch(step)  # (bucket name, (B, 3, T, H, W))
        x = x.to(device, non_blocking=True)
        parts = train_step(model, disc, perceptual, opt, opt_d, x, step, cfg.loss, oc.grad_clip, autocast)
        ema.update(model)
        window.add(parts, samples=x.shape[0], frames=x.shape[0] * x.shape[2])

        last = step == tc.steps
        if step % tc.log_every and not last:
            continue
        metrics = window.reduce(device) | data_metrics(batches, device)
        metrics |= {"step": step, "lr": schedule(step), "bucket_frames": x.shape[2]}
        if heldout and (step % tc.eval_every == 0 or last):
            metrics["heldout_psnr"] = evaluate_psnr(model, heldout, heldout_total, run, autocast)
            metrics["heldout_psnr_ema"] = evaluate_psnr(ema.module, heldout, heldout_total, run, autocast)
        if run.rank == 0:
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))

        if step % tc.ckpt_every == 0 or last:
            # Collective under FSDP: every rank gathers, rank 0 keeps the full dicts.
            state = {
                "model": model_state(model), "disc": model_state(disc),
                "opt": optimizer_state(model, opt), "opt_d": optimizer_state(disc, opt_d),
                "ema": ema.state_dict(), "step": step, "data_position": dict(batches.position),
                "data_budget": batches.budget.state_dict(),
                "config": stage_config_to_dict(cfg),
            }
            with_recon = bool(heldout) and step % tc.recon_every == 0
            save_and_report(run, step, metrics, state,
                            extras=(lambda folder: write_recon(folder, ema.module, heldout, step, device))
                            if with_recon else None)
        else:
            run.report(metrics, None)
    return getattr(run, "history", [])


def iter_metrics(path: str | Path) -> Iterator[dict[str, float]]:
    """Metrics a LocalRun wrote, one dict per report."""
    with Path(path).open() as fh:
        for line in fh:
            yield json.loads(line)
