"""What every training stage shares: where it runs, how the model is wrapped, and the step around it.

A stage is a module with ``main(cfg, run)`` (the loop, read top to bottom) and
``train_loop_per_worker(config)`` (the Ray Train entry point, ``run_worker(config, ...)``). It builds
on the pieces here:

- run contexts: ``LocalRun`` (one process; tests, quick experiments) and ``RayRun`` (a Ray Train
  worker), both with ``rank``, ``world_size``, ``device``, ``latest_checkpoint()`` and ``report()``;
- ``wrap``: DDP, or FSDP2 ``fully_shard`` with the stage's block classes as shard units;
- ``EMA``: a full copy of the weights on every rank, updated after each step, swappable into the
  live model for evaluation or sampling;
- ``LRSchedule``: linear warm-up, then constant or cosine down to a floor;
- ``autocast_for``: bf16 autocast on CUDA, fp32 on CPU;
- seeding: ``rank_seed`` and ``seed_everything``; RNG states are saved per rank in every checkpoint;
- ``reduce_sum`` / ``reduce_mean``: scalars across ranks (identity without a process group);
- the checkpoint cycle: ``find_resume`` / ``load_init`` / ``restore_rng`` at the start,
  ``save_and_report`` every ``ckpt_every`` steps (file format in trainer/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import tempfile
from collections.abc import Callable, Iterator
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
    rng_state,
    save_checkpoint,
    set_rng_state,
)

__all__ = [
    "EMA", "LRSchedule", "LocalRun", "RayRun", "Resume", "RunContext",
    "autocast_for", "default_device", "find_resume", "load_init", "load_optimizer_state", "model_state",
    "optimizer_state", "rank_seed", "reduce_mean", "reduce_sum", "restore_rng", "rng_state", "run_worker",
    "save_and_report", "seed_everything", "set_lr", "set_rng_state", "unwrap", "wrap",
]

# ---------------------------------------------------------------------------------------------
# Where the loop runs: a single process or a Ray Train worker
# ---------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    device: torch.device = field(default_factory=default_device)
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
        local = Path(tempfile.mkdtemp(prefix="resume_"))
        self._latest.to_directory(str(local))
        return local

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def run_worker(config: dict[str, Any], config_from_dict: Callable[[dict[str, Any]], Any],
               main: Callable[[Any, RunContext], Any]) -> None:
    """Body of a stage's ``train_loop_per_worker``: the keys jobs/train.py adds, then ``main`` on a RayRun.

    ``_threads_per_worker`` sets torch's thread count; ``_resume_from`` is the run's latest
    checkpoint when the job starts (Ray Train v2 has no resume_from_checkpoint).
    """
    config = dict(config)
    torch.set_num_threads(max(1, int(config.pop("_threads_per_worker", 1))))
    resume_from = config.pop("_resume_from", "")
    main(config_from_dict(config), RayRun(resume_from))


# ---------------------------------------------------------------------------------------------
# Wrapping for data parallelism
# ---------------------------------------------------------------------------------------------


def wrap(model: nn.Module, strategy: str, device: torch.device, world_size: int,
         shard_units: tuple[type[nn.Module], ...] = ()) -> nn.Module:
    """DDP, or FSDP2 with every module of a ``shard_units`` class its own shard unit (then the root);
    unchanged in a single process. The VAE passes its residual block, the DiT its transformer block."""
    if world_size == 1:
        return model
    if strategy == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy != "fsdp":
        raise ValueError(f"wrap: expected strategy 'ddp' or 'fsdp', got {strategy!r}")
    from torch.distributed.fsdp import fully_shard

    if shard_units:
        for module in model.modules():
            if isinstance(module, shard_units):
                fully_shard(module)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP holds (FSDP2 shards in place, so its model is already the module)."""
    return model.module if isinstance(model, DDP) else model


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 parameters are DTensors


def _local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``full`` laid out as parameter ``like`` (its own shard under FSDP2)."""
    full = full.to(device=like.device, dtype=like.dtype)
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    # Every rank holds the same full tensor, so each cuts its own shard: no communication.
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters, a full (unsharded) copy on every rank.

    Build it from the plain model before ``wrap``; ``update`` takes the wrapped one (under FSDP2 it
    gathers each parameter, a collective every rank must join). ``module`` is the averaged network
    (evaluate or sample with it directly), and ``swapped_into(model)`` puts the averaged weights
    into the live model for the duration of a ``with`` block.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay: expected a value in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
        for e, p in zip(self.module.parameters(), unwrap(model).parameters(), strict=True):
            e.lerp_(_full(p).detach().to(e.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the block with the EMA weights in ``model`` (plain, DDP or FSDP2); the trained weights
        come back afterwards, even if the block raises. Parameters only: buffers are left alone."""
        params = list(unwrap(model).parameters())
        with torch.no_grad():
            kept = [(p.to_local() if hasattr(p, "to_local") else p).clone() for p in params]
            for e, p in zip(self.module.parameters(), params, strict=True):
                (p.to_local() if hasattr(p, "to_local") else p).copy_(_local_part(e, p))
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in zip(kept, params, strict=True):
                    (p.to_local() if hasattr(p, "to_local") else p).copy_(k)


# ---------------------------------------------------------------------------------------------
# Learning rate, precision, seeds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class LRSchedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps`` (steps count from 1), then either
    ``"constant"`` or ``"cosine"``: half a cosine from ``peak`` at the end of warm-up to ``floor`` at
    ``total_steps``, held at ``floor`` after that (CogVideoX's DiT recipe)."""

    peak: float
    warmup_steps: int = 0
    kind: str = "constant"
    total_steps: int = 0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine"):
            raise ValueError(f"LRSchedule.kind: expected 'constant' or 'cosine', got {self.kind!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"LRSchedule.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.kind == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"LRSchedule: cosine needs total_steps > warmup_steps, got {self.total_steps} "
                             f"<= {self.warmup_steps}")
        if not 0.0 <= self.floor <= self.peak:
            raise ValueError(f"LRSchedule.floor: expected 0 <= floor <= peak={self.peak}, got {self.floor}")

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step <= self.warmup_steps:
            return self.peak * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; fp32 on CPU, where bf16 is slower (DESIGN.md section 6).

    ``precision``: "auto" or "fp32" (fp32 everywhere).
    """
    if precision not in ("auto", "fp32"):
        raise ValueError(f"autocast_for: expected precision 'auto' or 'fp32', got {precision!r}")
    if device.type == "cuda" and precision == "auto":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_seed(seed: int, rank: int) -> int:
    """A different stream per rank from one config seed (ranks draw different noise and crops)."""
    return seed * 1000 + rank


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every CUDA device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Scalars across ranks
# ---------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (in float64); the values themselves without a process group.
    A collective: every rank calls it with the same number of values."""
    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean over ranks."""
    if not _distributed():
        return list(values)
    world = dist.get_world_size()
    return [v / world for v in reduce_sum(values, device)]


# ---------------------------------------------------------------------------------------------
# The checkpoint cycle
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """A checkpoint of this run to continue from: the training state and this rank's RNG state."""

    folder: Path
    state: dict[str, Any]
    rng: dict[str, Any] | None

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_resume(run: RunContext) -> Resume | None:
    """The run's latest checkpoint, loaded (on CPU), or None for a fresh run."""
    folder = run.latest_checkpoint()
    if folder is None:
        return None
    state, rng = load_checkpoint(folder, rank=run.rank)
    return Resume(Path(folder), state, rng)


def load_init(init_from: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, state) of the latest checkpoint at or under ``init_from``: the previous stage whose
    weights (usually its ``"ema"``) start this one."""
    folder = latest_checkpoint(init_from)
    if folder is None:
        raise FileNotFoundError(f"train.init_from: expected a checkpoint under {init_from}, found none")
    state, _ = load_checkpoint(folder, rank=0)
    return folder, state


def restore_rng(resume: Resume | None) -> None:
    """Put back the RNG streams of the resumed step. Call it last, after every model, optimizer and
    data object is built, so nothing consumes the restored streams before the first step."""
    if resume is not None and resume.rng is not None:
        set_rng_state(resume.rng)


def save_and_report(run: RunContext, step: int, metrics: dict[str, float], state: dict[str, Any],
                    extras: Callable[[Path], None] | None = None) -> None:
    """Write the checkpoint of ``step`` (``state`` from rank 0, RNG from every rank), let rank 0 add
    ``extras(folder)`` (videos, sheets) beside it, and report it with the metrics.

    Build ``state`` on every rank with ``model_state``/``optimizer_state``: under FSDP2 they gather
    (a collective), and only rank 0's full dicts are written.
    """
    with tempfile.TemporaryDirectory(prefix="ckpt_") as tmp:
        folder = save_checkpoint(tmp, rank=run.rank, step=step, state=state if run.rank == 0 else None)
        if run.rank == 0 and extras is not None:
            extras(folder)
        run.report(metrics, folder)
