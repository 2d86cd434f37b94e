"""Step time and peak memory of one VAE training step at 17 and 161 frames.

    python bench/vae_memory.py                     # tiny preset on CPU, 64x64, one thread
    python bench/vae_memory.py --preset cogvideox  # on a GPU (peak from torch.cuda.max_memory_allocated)

Each measurement runs in a fresh subprocess so one configuration's allocator state cannot leak
into another's. A step is the real ``trainer.train_vae.train_step`` (autoencoder update with the
adversarial term and a discriminator update on a 17-frame window; perceptual loss off).

Peak memory on CPU: torch has no CPU allocator statistics and tracemalloc does not see tensor
storage, so we read the kernel's high-water mark. Before the measured step the script resets it
(``echo 5 > /proc/self/clear_refs`` resets VmHWM) and records VmRSS; the step's peak is
VmHWM - VmRSS afterwards, i.e. the memory the step itself added on top of model, optimizer state
and input. glibc is told to serve allocations above 64 KiB with mmap so freed tensors go back to
the kernel immediately (otherwise RSS keeps stale heap and hides the peak). On CUDA the peak is
``max_memory_allocated`` minus the memory allocated before the step.

Configurations: "chunked" = temporal chunks of 2 latent frames with one activation checkpoint per
chunk and the adaptive GAN weight taken at the output (stage 2's settings); "one-shot" = the whole
clip at once, no checkpointing, adaptive weight at the decoder's last layer (stage 1's settings).
The last line is ``mem_ratio_161_over_17=X`` for the chunked configuration (target <= 2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(preset: str, frames: int, size: int, chunk: int, checkpointing: str, steps: int) -> dict:
    import torch

    from trainer.losses import LossConfig, PatchDiscriminator3D
    from trainer.models.vae import CausalVAE, vae_config
    from trainer.train_vae import autocast_for, train_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CausalVAE(vae_config(preset, chunk_latent_frames=chunk, checkpointing=checkpointing)).to(device).train()
    disc = PatchDiscriminator3D(channels=16, layers=2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4)
    # Stage 2's loss settings: adversarial term on, adaptive weight taken at the output when chunked.
    lc = LossConfig(disc_start=0, disc_channels=16, disc_layers=2, disc_frames=17,
                    adaptive_weight_on="output" if checkpointing == "chunk" else "last_layer")
    x = (torch.rand(1, 3, frames, size, size, device=device) * 2 - 1)
    autocast = autocast_for(device, "auto")
    train_step(model, disc, None, opt, opt_d, x, 1, lc, 1.0, autocast)  # warm-up: optimizer state, kernels

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kib("VmRSS") * 1024
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        train_step(model, disc, None, opt, opt_d, x, 2 + s, lc, 1.0, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024
    return {"frames": frames, "step_s": min(times), "peak_mib": (peak - base) / 2**20, "device": device.type}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def run_child(args: argparse.Namespace, frames: int, chunk: int, checkpointing: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", json.dumps(
        {"preset": args.preset, "frames": frames, "size": args.size, "chunk": chunk,
         "checkpointing": checkpointing, "steps": args.steps})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {frames} frames failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=64, help="frame height and width")
    p.add_argument("--steps", type=int, default=1, help="measured steps (after one warm-up); time is the fastest")
    p.add_argument("--skip-one-shot", action="store_true", help="skip the one-shot 161-frame comparison")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    rows = []
    for label, chunk, ckpt in [("chunked", 2, "chunk"), ("one-shot", 0, "none")]:
        for frames in (17, 161):
            if label == "one-shot" and args.skip_one_shot:
                continue
            r = run_child(args, frames, chunk, ckpt)
            r["config"] = label
            rows.append(r)
            print(f"{args.preset:10s} {label:9s} {frames:4d} frames {args.size}x{args.size}: "
                  f"step {r['step_s']:7.2f} s   peak +{r['peak_mib']:8.1f} MiB   ({r['device']})", flush=True)
    chunked = {r["frames"]: r for r in rows if r["config"] == "chunked"}
    one_shot = {r["frames"]: r for r in rows if r["config"] == "one-shot"}
    if 161 in one_shot:
        print(f"one-shot/chunked peak at 161 frames: {one_shot[161]['peak_mib'] / chunked[161]['peak_mib']:.2f}")
        print(f"one-shot 161/17 peak ratio: {one_shot[161]['peak_mib'] / one_shot[17]['peak_mib']:.2f}")
    print(f"step time 161/17 (chunked): {chunked[161]['step_s'] / chunked[17]['step_s']:.2f}")
    print(f"mem_ratio_161_over_17={chunked[161]['peak_mib'] / chunked[17]['peak_mib']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
