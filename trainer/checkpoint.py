"""Checkpoint files of a training run.

A checkpoint is one folder:
- ``state.pt`` (rank 0): the stage's training state, a dict with at least ``step``; every stage keeps
  ``model``, ``ema``, ``opt``, ``data_position`` and ``config`` (the VAE adds ``disc`` and ``opt_d``);
- ``rng_rank{r}.pt`` (every rank): Python, NumPy and torch RNG states of that rank;
- ``meta.json`` (rank 0): ``{"step": N}``, so the latest checkpoint can be found without unpickling;
- whatever the stage writes beside them on rank 0, e.g. the VAE's ``recon_step{N}_{i}.mp4``
  (held-out clips, original | reconstruction).

Under Ray Train every rank reports its folder and Ray merges them into one checkpoint. The save and
resume cycle around these files is trainer/runtime.py (``save_and_report``, ``find_resume``).
Model and optimizer states are gathered as full (unsharded) state dicts with
``torch.distributed.checkpoint.state_dict``, which handles plain, DDP and FSDP2 modules alike.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from catalog.shards import encode_h264

STATE_FILE = "state.pt"
META_FILE = "meta.json"

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD = StateDictOptions(full_state_dict=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on rank 0 (empty elsewhere under a process group); collective under FSDP."""
    return get_model_state_dict(model, options=_FULL)


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, opt, options=_FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=_LOAD)


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, opt, state, options=_LOAD)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str | Path, *, rank: int, step: int, state: dict[str, Any] | None) -> Path:
    """Write this rank's part of the checkpoint for ``step``; rank 0 passes ``state``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    if rank == 0:
        if state is None:
            raise ValueError("save_checkpoint: rank 0 must pass the training state")
        torch.save(state, folder / STATE_FILE)
        (folder / META_FILE).write_text(json.dumps({"step": step}))
    return folder


def load_checkpoint(folder: str | Path, *, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(training state, this rank's RNG state or None when the checkpoint lacks it)."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"expected a checkpoint with {STATE_FILE} in {folder}, found none")
    # weights_only=False: the state holds the RNG and config objects we wrote ourselves.
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    rng_file = folder / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    return state, rng


def checkpoint_step(folder: str | Path) -> int:
    return int(json.loads((Path(folder) / META_FILE).read_text())["step"])


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint folder with the highest step at or below ``root`` (itself included), or None."""
    root = Path(root)
    if not root.exists():
        return None
    found = [(checkpoint_step(m.parent), str(m.parent)) for m in root.rglob(META_FILE) if (m.parent / STATE_FILE).is_file()]
    if not found:
        return None
    return Path(max(found)[1])


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """(T, H, W, 3) uint8 -> H.264 mp4 (byte-identical run to run, see catalog.shards.encode_h264)."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video: expected (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path.write_bytes(encode_h264(list(frames), fps, options={"crf": "18"}))
    return path
