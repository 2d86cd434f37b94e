"""Export a trained DiT checkpoint as a diffusers folder (``CogVideoXTransformer3DModel`` + scheduler).

    python -m jobs.export --checkpoint RUN/checkpoint_NNNNNN --to diffusers --output OUT

Writes the layout of trainer/export.py: ``OUT/transformer`` (safetensors + config.json, loads with
``CogVideoXTransformer3DModel.from_pretrained``), ``OUT/scheduler`` (``CogVideoXDDIMScheduler``, the
schedule the DiT was trained with) and references to the VAE checkpoint and text encoder it used.
Exit status: 0 done, 2 bad arguments (one line on stderr).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from jobs import _cli

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None):
    p = _cli.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="DiT checkpoint folder, or a run folder (its latest)")
    p.add_argument("--to", required=True, choices=("diffusers",), help="output format")
    p.add_argument("--output", required=True, help="folder to write (must be empty or absent)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights (default ema)")
    p.add_argument("--dtype", choices=DTYPES, default="", help="cast the saved weights (default: as trained)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint}: no such folder")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.error(f"--output {args.output}: expected an empty or absent folder")
    return args


@_cli.entry
def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = parse_args(argv)
    import torch

    from catalog.config import from_dict
    from trainer.diffusion import ScheduleConfig
    from trainer.export import export_diffusers
    from trainer.models.dit import DiTConfig
    from trainer.runtime import load_init

    try:
        folder, state = load_init(args.checkpoint)
        model_cfg = from_dict(DiTConfig, dict(state["dit_config"]), where="dit_config")
        attention = state.get("config", {}).get("model", {}).get("attention", "full")
        if attention != "full":
            raise ValueError(f"[model] attention = {attention!r}: only full attention is diffusers' "
                             "CogVideoXTransformer3DModel, a Latte variant has no diffusers class to load into")
        schedule = from_dict(ScheduleConfig, dict(state["schedule"]), where="schedule")
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise _cli.UsageError(f"--checkpoint {args.checkpoint}: expected a DiT stage checkpoint: {err}") from None
    out = export_diffusers(
        model_cfg, state[args.weights], args.output, text_encoder=state["text_encoder"]["model"],
        vae_checkpoint=state["vae_checkpoint"], schedule=schedule,
        dtype=getattr(torch, args.dtype) if args.dtype else None, latent_scale_factor=float(state["latent_scale"]),
    )
    _cli.summary_table(f"exported {folder}", [
        ("format", "diffusers (CogVideoXTransformer3DModel, CogVideoXDDIMScheduler)"),
        ("weights", f"{args.weights} of step {state['step']}"),
        ("text encoder", state["text_encoder"]["description"]),
        ("output", str(out)), ("wall time", f"{time.time() - t0:.1f}s"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
