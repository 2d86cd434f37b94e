"""Progressive distillation (Salimans & Ho 2022, as Imagen Video uses it): a student initialised from
the teacher learns to take one DDIM step where the teacher takes two, halving the step count per round
(N -> N/2). Plain functions over a Denoiser (trainer.diffusion), v-parameterisation throughout.

One round, for a student sampling with N steps on the grid of trainer.diffusion.ddim_timesteps(N):

1. a training x_t = q_sample(x0, eps, t) at a student grid time t, its next time t' = t - T/N;
2. the teacher steps t -> t - T/(2N) -> t' with two deterministic DDIM steps (classifier-free guided
   with weight w when a null text is given), landing at x_{t'};
3. the student's target is the x0 (and so the v) whose single DDIM step t -> t' lands on the same
   x_{t'}: x0~ = (x_{t'} - c_x x_t) / c_x0 with ddim_step's coefficients c_x, c_x0 for (t, t');
4. the loss is the v-MSE against that target (the DiT stage's loss, x0-MSE weighted 1 / (1 - alpha_bar)).

Guidance distillation (Imagen Video's first stage, after Meng et al. 2023 "On distillation of guided diffusion
models"): a student with the guidance weight as an input (DiT ``guidance_conditioning``, initialised from the
teacher, its w embedding zero so it starts at the teacher's conditional prediction) learns, at uniform t and w
drawn uniformly from [w_min, w_max] per sample, the teacher's guided v_u + w (v_c - v_u) in one pass. The
progressive rounds then distil that w-conditioned model into itself, teacher and student both given the same w
(``distill_round(..., guidance_range=)``), so the final student samples any w in the range at N / 2^K steps.

The stage (``[stage] kind = "dit_distill"``, jobs/configs/dit_distill.toml, run by jobs.train): ``main(cfg, run)``
reads a DiT stage checkpoint (its EMA weights, VAE, text encoder, latent scale, schedule), runs guidance
distillation then K rounds on batches of the stage's shards, and writes one checkpoint of the student whose
stored stage config samples it as it was distilled ([sample] steps = N / 2^K) and whose ``distill`` record
names the teacher, the rounds and the w range. One process (``[ray] workers = 1``); a run folder that already
holds its checkpoint is left as it is.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from catalog.config import from_dict
from trainer.config import RayConfig, StageConfig
from trainer.data import DiTBatches, DiTDataConfig, batch_latents, batch_text, check_data, posterior_generator
from trainer.diffusion import Denoiser, ScheduleConfig, alphas_cumprod, cfg_combine, ddim_step, ddim_timesteps, q_sample


@dataclass(frozen=True, kw_only=True, slots=True)
class DistillConfig:
    student_steps: int = 4
    """N of this round: the student samples with N steps, the teacher with 2N."""
    train_steps: int = 500
    lr: float = 1e-4
    guidance_scale: float = 1.0
    """The teacher's CFG weight w baked into the student (1 = the conditional prediction alone)."""
    seed: int = 0
    grad_clip: float = 0.0
    """Clip the gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        if self.student_steps < 1 or 1000 % (2 * self.student_steps):
            raise ValueError(f"DistillConfig.student_steps: expected N >= 1 with 2N dividing 1000 (the teacher's "
                             f"grid then contains the student's), got {self.student_steps}")
        if self.train_steps < 1 or self.lr <= 0:
            raise ValueError(f"DistillConfig: expected train_steps >= 1 and lr > 0, got {self.train_steps}, {self.lr}")


def _v(model: Denoiser, x: torch.Tensor, text: torch.Tensor, t: int, w: float, null_text: torch.Tensor | None,
       w_input: torch.Tensor | None = None) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
    if w_input is not None:  # a guidance-distilled model: the weight is its input, one pass
        return model(x, text, tt, guidance=w_input).float()
    if null_text is None or w == 1.0:
        return model(x, text, tt).float()
    both = torch.cat([null_text.expand_as(text), text])  # (2B, L, E): [null; text], as the sampler
    v_u, v_c = model(torch.cat([x, x]), both, torch.cat([tt, tt])).float().chunk(2)
    return cfg_combine(v_u, v_c, w)


@torch.no_grad()
def two_step_target(teacher: Denoiser, x_t: torch.Tensor, text: torch.Tensor, t: int, student_steps: int,
                    ac: torch.Tensor, *, guidance_scale: float = 1.0, null_text: torch.Tensor | None = None,
                    guidance_input: torch.Tensor | None = None) -> torch.Tensor:
    """The v target (B, T, C, H, W) of one student step from x_t at time t: the v whose DDIM step
    t -> t - T/N lands where two teacher steps t -> t - T/2N -> t - T/N land. ``guidance_input`` (B,): the
    teacher is guidance-distilled and takes these weights as its input (``guidance_scale``/``null_text`` unused)."""
    big_t = ac.shape[0]
    t_mid, t_next = t - big_t // (2 * student_steps), t - big_t // student_steps
    w_in = guidance_input
    x_mid = ddim_step(x_t, _v(teacher, x_t, text, t, guidance_scale, null_text, w_in), t, t_mid, ac)
    x_next = ddim_step(x_mid, _v(teacher, x_mid, text, t_mid, guidance_scale, null_text, w_in), t_mid, t_next, ac)
    a_t = float(ac[t])
    a_next = float(ac[t_next]) if t_next >= 0 else 1.0
    c_x = ((1.0 - a_next) / (1.0 - a_t)) ** 0.5
    c_x0 = a_next**0.5 - a_t**0.5 * c_x  # > 0 since a_next > a_t
    x0 = (x_next - c_x * x_t) / c_x0
    return (a_t**0.5 * x_t - x0) / (1.0 - a_t) ** 0.5  # v = (sqrt(a) x_t - x0) / sqrt(1 - a)


def _draw_w(g: torch.Generator, b: int, guidance_range: tuple[float, float], device: torch.device) -> torch.Tensor:
    lo, hi = guidance_range
    return (lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)).float().to(device)  # (B,)


def distill_round(student: nn.Module, teacher: Denoiser, data: Iterator[tuple[torch.Tensor, torch.Tensor]],
                  cfg: DistillConfig, ac: torch.Tensor, *, null_text: torch.Tensor | None = None,
                  guidance_range: tuple[float, float] | None = None,
                  log: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``student`` (initialised from the teacher) for one round; ``data`` yields (x0 (B, T, C, H, W),
    text (B, L, E)). Returns the loss of every step. Grid times are drawn per sample from the student's
    N-step grid with a generator seeded by cfg.seed. ``guidance_range`` (w_min, w_max): teacher and student are
    guidance-distilled (they take w as an input); each sample draws its w uniformly from the range and both
    models are given it. ``log(step, loss)`` is called after every step."""
    grid = ddim_timesteps(cfg.student_steps, ac.shape[0])  # (N,)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    student.train()
    losses = []
    for step in range(1, cfg.train_steps + 1):
        x0, text = next(data)
        b = x0.shape[0]
        t = grid[torch.randint(0, len(grid), (1,), generator=g)].item()  # one grid time per batch: one target pass
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        tt = torch.full((b,), t, dtype=torch.int64, device=x0.device)
        x_t = q_sample(x0, noise, tt, ac)
        w = None if guidance_range is None else _draw_w(g, b, guidance_range, x0.device)
        target = two_step_target(teacher, x_t, text, t, cfg.student_steps, ac, guidance_scale=cfg.guidance_scale,
                                 null_text=null_text, guidance_input=w)
        pred = student(x_t, text, tt) if w is None else student(x_t, text, tt, guidance=w)
        loss = (pred.float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    student.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Guidance distillation (Imagen Video's first stage)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def guided_v(teacher: Denoiser, x_t: torch.Tensor, text: torch.Tensor, t: torch.Tensor, w: torch.Tensor,
             null_text: torch.Tensor) -> torch.Tensor:
    """The teacher's classifier-free guided v (B, T, C, H, W) with a weight per sample: v_u + w (v_c - v_u),
    the two passes as one batch [null; text] as the sampler runs them. t, w: (B,)."""
    both = torch.cat([null_text.expand_as(text), text])  # (2B, L, E)
    v_u, v_c = teacher(torch.cat([x_t, x_t]), both, torch.cat([t, t])).float().chunk(2)
    return v_u + w.float().reshape(-1, *([1] * (x_t.dim() - 1))) * (v_c - v_u)


def distill_guidance(student: nn.Module, teacher: Denoiser, data: Iterator[tuple[torch.Tensor, torch.Tensor]],
                     ac: torch.Tensor, null_text: torch.Tensor, *, steps: int, lr: float,
                     guidance_range: tuple[float, float], seed: int = 0, grad_clip: float = 0.0,
                     log: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the w-conditioned ``student`` to give, in one pass, the teacher's guided v at every t and every w
    of ``guidance_range``: per sample t ~ U{0..T-1}, w ~ U[w_min, w_max], x_t = q_sample(x0, noise, t), loss
    the v-MSE to ``guided_v``. Returns the loss of every step."""
    big_t = ac.shape[0]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    losses = []
    for step in range(1, steps + 1):
        x0, text = next(data)
        b = x0.shape[0]
        t = torch.randint(0, big_t, (b,), generator=g).to(x0.device)
        w = _draw_w(g, b, guidance_range, x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        x_t = q_sample(x0, noise, t, ac)
        target = guided_v(teacher, x_t, text, t, w, null_text)
        loss = (student(x_t, text, t, guidance=w).float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:  # a batch of high-w samples at high t has targets many times the data's size
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    student.eval()
    return losses


def student_from_teacher(teacher: nn.Module) -> nn.Module:
    """A guidance-conditioned copy of a DiT teacher: every teacher weight, the new w embedding at its zero
    init (so it starts as the teacher's conditional prediction)."""
    from trainer.models.dit import DiT

    if type(teacher) is not DiT:
        raise ValueError(f"guidance distillation: expected a full-attention DiT teacher, got {type(teacher).__name__}"
                         " (the Latte variants have no guidance input)")
    student = DiT(dataclasses.replace(teacher.cfg, guidance_conditioning=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("guidance_embedding.") for k in missing):
        raise ValueError(f"guidance distillation: teacher and student differ beyond the w embedding: missing "
                         f"{missing}, unexpected {unexpected}")
    return student.to(next(teacher.parameters()).device)


# ---------------------------------------------------------------------------------------------
# The stage: [stage] kind = "dit_distill"
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherSection:
    checkpoint: str = ""
    """A DiT stage's run folder (its latest checkpoint) or checkpoint folder."""
    weights: str = "ema"
    """Which of its weights teach: "ema" or "model"."""

    def __post_init__(self) -> None:
        if self.weights not in ("ema", "model"):
            raise ValueError(f"[teacher] weights: expected 'ema' or 'model', got {self.weights!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class GuidanceSection:
    w_min: float = 1.0
    """Smallest guidance weight the student learns (1 = the conditional prediction alone)."""
    w_max: float = 8.0
    """Largest; CogVideoX samples at 6."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.w_min <= self.w_max:
            raise ValueError(f"[guidance]: expected 0 <= w_min <= w_max, got {self.w_min} and {self.w_max}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ProgressiveSection:
    teacher_steps: int = 8
    """N: the DDIM steps the guidance-distilled model is distilled from; round k's student samples N / 2^k."""
    rounds: int = 1
    """K progressive rounds after guidance distillation; 0 = guidance distillation only (N steps)."""

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.teacher_steps < 1:
            raise ValueError(f"[progressive]: expected teacher_steps >= 1 and rounds >= 0, got {self.teacher_steps} "
                             f"and {self.rounds}")
        n = self.teacher_steps
        for _ in range(self.rounds):
            if n % 2 or 1000 % n:
                raise ValueError(f"[progressive]: teacher_steps={self.teacher_steps} cannot be halved {self.rounds} "
                                 f"times on the 1000-step grid (each round's teacher steps must be even and divide 1000)")
            n //= 2

    @property
    def student_steps(self) -> int:
        return self.teacher_steps >> self.rounds


@dataclass(frozen=True, kw_only=True, slots=True)
class DistillTrainSection:
    steps: int = 500
    """Optimizer steps of each phase: the guidance distillation and every progressive round."""
    lr: float = 1e-4
    seed: int = 0
    log_every: int = 50
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off): high-w targets at high t are many times the data's size."""
    batch_reuse: int = 1
    """Optimizer steps per data batch, each with its own timesteps, noise and w. On small models the frozen VAE's
    encode of a pixel batch costs more than the teacher passes of a step; precomputed-latent shards need none."""
    precision: str = "fp32"
    """Only "fp32" so far: the targets are differences of teacher passes, which bf16 would blur."""

    def __post_init__(self) -> None:
        if self.grad_clip < 0 or self.batch_reuse < 1:
            raise ValueError(f"[train]: expected grad_clip >= 0 and batch_reuse >= 1, got {self.grad_clip} and "
                             f"{self.batch_reuse}")
        if self.steps < 1 or self.lr <= 0 or self.log_every < 1:
            raise ValueError(f"[train]: expected steps >= 1, lr > 0 and log_every >= 1, got {self.steps}, {self.lr}, "
                             f"{self.log_every}")
        if self.precision != "fp32":
            raise ValueError(f"[train] precision: expected 'fp32', got {self.precision!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DistillStageConfig:
    stage: StageConfig = StageConfig(kind="dit_distill")
    teacher: TeacherSection = TeacherSection()
    data: DiTDataConfig = DiTDataConfig()
    guidance: GuidanceSection = GuidanceSection()
    progressive: ProgressiveSection = ProgressiveSection()
    train: DistillTrainSection = DistillTrainSection()
    ray: RayConfig = RayConfig(name="dit_distill")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("teacher.checkpoint", "data.root", "ray.storage_path")

    def __post_init__(self) -> None:
        if self.stage.kind != "dit_distill":
            raise ValueError(f"DistillStageConfig: expected [stage] kind = 'dit_distill', got {self.stage.kind!r}")
        if not self.teacher.checkpoint:
            raise ValueError("[teacher] checkpoint: expected a DiT stage's run or checkpoint folder, got ''")
        if self.ray.workers != 1:
            raise ValueError(f"[ray] workers: distillation runs in one process, expected 1, got {self.ray.workers}")


def config_from_dict(data: dict[str, Any]) -> DistillStageConfig:
    """The stage from a parsed TOML (or ``dataclasses.asdict`` of one); unknown keys raise naming them."""
    return from_dict(DistillStageConfig, data, where="dit_distill stage")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point."""
    from trainer.runtime import run_worker

    run_worker(config, config_from_dict, main)


def _batches(cfg: DistillStageConfig, vae: nn.Module, encoder: Any, scale: float, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x0 (B, t, C, h, w), text (B, L, D)) from the stage's shards: posterior samples of the frozen VAE times the
    teacher's latent scale, captions through its text encoder (no dropout: the null text is the guidance's)."""
    factors = {"spatial_factor": vae.cfg.spatial_factor, "temporal_factor": vae.cfg.temporal_factor}
    stream = DiTBatches(cfg.data, seed=cfg.train.seed, **factors)
    for k, batch in enumerate(stream):
        x0 = batch_latents(batch, scale=scale, vae=vae, generator=posterior_generator(cfg.train.seed, k, 0),
                           device=device).permute(0, 2, 1, 3, 4)
        emb, _ = batch_text(batch, encoder=encoder, device=device)
        for _ in range(cfg.train.batch_reuse):
            yield x0, emb.float()


def load_teacher(checkpoint: str | Path, weights: str, device: torch.device) -> tuple[Path, dict[str, Any], nn.Module]:
    """(folder, state, frozen DiT) of a DiT stage checkpoint."""
    from trainer.models.dit import DiT, DiTConfig
    from trainer.runtime import load_init

    folder, state = load_init(checkpoint)
    if "dit_config" not in state or state.get("config", {}).get("model", {}).get("attention", "full") != "full":
        raise ValueError(f"[teacher] checkpoint {folder}: expected a full-attention DiT stage checkpoint")
    dit_cfg = from_dict(DiTConfig, dict(state["dit_config"]), where="dit_config")
    if dit_cfg.fps_conditioning or dit_cfg.guidance_conditioning:
        raise ValueError(f"[teacher] checkpoint {folder}: a teacher with fps or guidance conditioning is not "
                         "supported yet; expected a plain DiT")
    teacher = DiT(dit_cfg)
    teacher.load_state_dict(state[weights])
    return folder, state, teacher.to(device).eval().requires_grad_(False)


def main(cfg: DistillStageConfig, run: Any) -> list[dict[str, float]]:
    """Guidance distillation, then ``[progressive] rounds`` rounds, then one student checkpoint."""
    from trainer.runtime import save_and_report, seed_everything
    from trainer.sampling import load_vae
    from trainer.text import TextConfig, TextEncoder

    device = run.device
    if run.latest_checkpoint() is not None:
        print(f"[distill] {run.latest_checkpoint()} exists: this run is done")
        return getattr(run, "history", [])
    counts = check_data(cfg.data)  # bad data fails before any model loads
    folder, tstate, teacher = load_teacher(cfg.teacher.checkpoint, cfg.teacher.weights, device)
    tconf = tstate["config"]
    vae, _ = load_vae(tstate["vae_checkpoint"], tconf["vae"]["weights"], device)
    encoder = TextEncoder(from_dict(TextConfig, dict(tconf["text"]), where="text"), device)
    schedule = from_dict(ScheduleConfig, dict(tstate["schedule"]), where="schedule")
    ac = alphas_cumprod(schedule).to(device)
    scale = float(tstate["latent_scale"])
    null_text = encoder.empty()[0][None].float()  # (1, L, D)
    tc, wr = cfg.train, (cfg.guidance.w_min, cfg.guidance.w_max)
    print(f"[distill] teacher {folder} (step {tstate['step']}), data {', '.join(f'{b} {n}' for b, n in counts.items())}"
          f"; guidance w in [{wr[0]:g}, {wr[1]:g}], then {cfg.progressive.rounds} round(s) "
          f"{cfg.progressive.teacher_steps} -> {cfg.progressive.student_steps} steps, {tc.steps} steps each")

    seed_everything(tc.seed)
    data = _batches(cfg, vae, encoder, scale, device)
    phases: list[dict[str, Any]] = []

    def logger(phase: str, offset: int) -> Callable[[int, float], None]:
        def log(step: int, loss: float) -> None:
            if step % tc.log_every == 0 or step == tc.steps:
                metrics = {"step": offset + step, "phase": phase, "loss": loss}
                print(json.dumps(metrics))
                run.report({"step": offset + step, "loss": loss}, None)
        return log

    student = student_from_teacher(teacher)
    losses = distill_guidance(student, teacher, data, ac, null_text, steps=tc.steps, lr=tc.lr, guidance_range=wr,
                              seed=tc.seed, grad_clip=tc.grad_clip, log=logger("guidance", 0))
    phases.append({"phase": "guidance", "steps": tc.steps, "first_loss": losses[0], "last_loss": losses[-1]})
    n = cfg.progressive.teacher_steps
    for k in range(cfg.progressive.rounds):
        round_teacher = copy.deepcopy(student).eval().requires_grad_(False)
        rc = DistillConfig(student_steps=n // 2, train_steps=tc.steps, lr=tc.lr, seed=tc.seed + 1 + k,
                           grad_clip=tc.grad_clip)
        losses = distill_round(student, round_teacher, data, rc, ac, guidance_range=wr,
                               log=logger(f"round {k + 1}: {n} -> {n // 2} steps", (k + 1) * tc.steps))
        phases.append({"phase": f"round {k + 1}", "teacher_steps": n, "student_steps": n // 2, "steps": tc.steps,
                       "first_loss": losses[0], "last_loss": losses[-1]})
        n //= 2
    data.close()

    total = tc.steps * (1 + cfg.progressive.rounds)
    stored = copy.deepcopy(tconf)
    stored.setdefault("sample", {})["steps"] = n  # the student samples at the steps it was distilled to
    weights = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    state = {
        "model": weights, "ema": weights, "step": total, "config": stored,
        "dit_config": dataclasses.asdict(student.cfg), "schedule": dict(tstate["schedule"]),
        "text_encoder": tstate.get("text_encoder"), "latent_scale": scale, "vae_checkpoint": tstate["vae_checkpoint"],
        "distill": {"teacher": str(folder), "teacher_step": int(tstate["step"]), "sampling_steps": n,
                    "guidance": {"input": True, "w_min": wr[0], "w_max": wr[1]}, "phases": phases,
                    "stage": dataclasses.asdict(cfg)},
    }
    metrics = {"step": total, "loss": phases[-1]["last_loss"], "sampling_steps": n}
    save_and_report(run, total, metrics, state)
    print(f"[distill] student: {n} steps, guidance w in [{wr[0]:g}, {wr[1]:g}] as an input")
    return getattr(run, "history", [])


__all__ = ["DistillConfig", "DistillStageConfig", "config_from_dict", "distill_guidance", "distill_round", "guided_v",
           "main", "student_from_teacher", "train_loop_per_worker", "two_step_target"]
