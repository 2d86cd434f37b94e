"""What a stage logs between two reports: step means across ranks, throughput and MFU.

``MetricWindow`` collects per-step scalars (losses, grad norms) and counts (samples, frames,
tokens); ``reduce`` averages each scalar over every (step, rank) that produced it and turns each
count into a rate. MFU follows torchtitan (anchors/dit.md section 7): flops per token =
6 * per-token matmul parameters + 12 * layers * width * sequence length, and
MFU = flops per token * tokens/s / peak flops.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.runtime import reduce_sum

# Dense bf16 peak per GPU, without 2:4 sparsity (torchtitan tools/utils.py get_peak_flops).
PEAK_BF16_FLOPS: dict[str, float] = {
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM; listed after the PCIe/NVL names so those match first
    "H200": 989e12,
    "H20": 148e12,
    "B200": 2.5e15,
    "B300": 2.5e15,
}


def data_metrics(batches: Any, device: torch.device) -> dict[str, float]:
    """Samples read and bad samples skipped (``batches.metrics()``: a loader's ``BadSampleBudget``), summed over
    ranks (a collective: every rank calls it)."""
    m = batches.metrics()
    read, bad = reduce_sum([m["data_samples_read"], m["data_bad_samples"]], device)
    return {"data_samples_read": read, "data_bad_samples": bad, "data_bad_fraction": bad / max(read, 1.0)}


class MetricWindow:
    """Scalars and counts of the steps since the last ``reduce``, on one rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self._totals: dict[str, float] = {}
        self.steps = 0
        self._started = time.perf_counter()

    def add(self, values: dict[str, float], **counts: float) -> None:
        """One step: ``values`` to average (a key may be missing on some steps or ranks, e.g. a
        discriminator loss before it starts or a loss per timestep slice), ``counts`` to turn into
        rates, e.g. ``samples=2, tokens=4096``."""
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
            self._counts[k] = self._counts.get(k, 0.0) + 1.0
        for k, n in counts.items():
            self._totals[k] = self._totals.get(k, 0.0) + float(n)
        self.steps += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means of the scalars over all ranks, ``<count>_per_s`` (all ranks together, over this
        rank's wall time since the last reduce) and ``step_time_s``; then starts a new window.
        A collective: every rank calls it at the same step."""
        elapsed = time.perf_counter() - self._started
        keys = _all_keys(sorted(self._sums), device)
        names = _all_keys(sorted(self._totals), device)
        local = ([self._sums.get(k, 0.0) for k in keys] + [self._counts.get(k, 0.0) for k in keys]
                 + [self._totals.get(n, 0.0) for n in names])
        reduced = reduce_sum(local, device)
        sums, counts, totals = reduced[:len(keys)], reduced[len(keys):2 * len(keys)], reduced[2 * len(keys):]
        out = {k: s / c for k, s, c in zip(keys, sums, counts, strict=True) if c > 0}
        out |= {f"{n}_per_s": t / elapsed for n, t in zip(names, totals, strict=True)}
        out["step_time_s"] = elapsed / max(self.steps, 1)
        self.reset()
        return out


def _all_keys(keys: list[str], device: torch.device) -> list[str]:
    """The union of every rank's keys, sorted, so the reduced vectors line up."""
    if not (dist.is_available() and dist.is_initialized()):
        return keys
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return sorted({k for part in gathered for k in (part or [])})


def matmul_params(model: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    """Weights every token is multiplied by: Linear and Conv weights, minus modules whose qualified
    name contains one of ``exclude`` (per-sample layers such as a DiT's adaLN projections and the
    timestep MLP, which run once per sample, not once per token). Embedding tables are not matmuls."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not any(x in name for x in exclude):
            total += module.weight.numel()
    return total


def transformer_flops_per_token(matmul_params: int, layers: int, width: int, seq_len: int) -> float:
    """Training flops per token (forward + backward): 6 * N + 12 * L * D * S (torchtitan's dense count;
    attention recomputation is not counted)."""
    return 6.0 * matmul_params + 12.0 * layers * width * seq_len


def mfu_percent(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model flops utilisation in percent: achieved flops over ``peak_flops`` (per device: pass this
    device's tokens/s)."""
    if peak_flops <= 0:
        raise ValueError(f"mfu_percent: expected a positive peak_flops, got {peak_flops}")
    return 100.0 * flops_per_token * tokens_per_s / peak_flops


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of ``device`` from PEAK_BF16_FLOPS, or None (CPU, unknown GPU: no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None
