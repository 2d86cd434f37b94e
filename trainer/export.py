"""Write a trained DiT as a diffusers folder (issue 8 item 3).

Layout of ``out_dir``::

    model_index.json                     CogVideoXPipeline; vae / text_encoder / tokenizer are null
    transformer/config.json              CogVideoXTransformer3DModel's config keys
    transformer/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json      CogVideoXDDIMScheduler, the schedule trainer.diffusion trained with
    vae/reference.json, vae/README.md    our causal VAE's checkpoint: NOT diffusers' AutoencoderKLCogVideoX
    text_encoder/reference.json          the T5 encoder (hub id or path) and its 226-token tokenisation

``CogVideoXTransformer3DModel.from_pretrained(out_dir / "transformer")`` loads the DiT directly (the
parameter names and shapes are diffusers'). The VAE is this project's (trainer/models/vae.py), whose
weights do not fit diffusers' VAE class, so the folder references it instead of pretending; a
pipeline is built with ``CogVideoXPipeline.from_pretrained(out_dir, vae=..., text_encoder=...,
tokenizer=...)`` passing those in (or None to denoise latents only).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer.diffusion import ScheduleConfig
from trainer.models.dit import DiT, DiTConfig

# The oldest diffusers release with CogVideoX; written as the config's "_diffusers_version".
DIFFUSERS_VERSION = "0.30.0"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def transformer_config(cfg: DiTConfig) -> dict[str, Any]:
    """``CogVideoXTransformer3DModel``'s config.json for ``cfg`` (every __init__ argument)."""
    if getattr(cfg, "guidance_conditioning", False):
        raise ValueError("export: a guidance-distilled DiT (guidance_conditioning, trainer/distill.py) takes the CFG "
                         "weight as an input that diffusers' CogVideoXTransformer3DModel does not have; expected a "
                         "DiT without it")
    return {
        "_class_name": "CogVideoXTransformer3DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": cfg.head_dim,
        "dropout": 0.0,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": cfg.in_channels,
        "max_text_seq_length": cfg.max_text_len,
        "norm_elementwise_affine": True,
        "norm_eps": cfg.norm_eps,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "ofs_embed_dim": cfg.time_embed_dim if cfg.fps_conditioning else None,  # fps enters as diffusers' ofs
        "out_channels": cfg.out_channels,
        "patch_bias": cfg.patch_bias,
        "patch_size": cfg.patch_size,
        "patch_size_t": cfg.patch_size_t,
        "sample_frames": cfg.sample_frames,
        "sample_height": cfg.sample_height,
        "sample_width": cfg.sample_width,
        "spatial_interpolation_scale": cfg.spatial_interpolation_scale,
        "temporal_compression_ratio": cfg.temporal_compression,
        "temporal_interpolation_scale": cfg.temporal_interpolation_scale,
        "text_embed_dim": cfg.text_dim,
        "time_embed_dim": cfg.time_embed_dim,
        "timestep_activation_fn": "silu",
        "use_learned_positional_embeddings": False,
        "use_rotary_positional_embeddings": cfg.pos_embed == "rope",
    }


def scheduler_config(schedule: ScheduleConfig) -> dict[str, Any]:
    """``CogVideoXDDIMScheduler``'s scheduler_config.json with the schedule of trainer.diffusion."""
    return {
        "_class_name": "CogVideoXDDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": schedule.beta_end,
        "beta_schedule": "scaled_linear",
        "beta_start": schedule.beta_start,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "snr_shift_scale": schedule.snr_shift_scale,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
    }


def _checked_state_dict(cfg: DiTConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Checkpoints of a torch.compile'd or DDP-wrapped model carry a prefix on every key.
    clean = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state_dict.items()}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    missing, unexpected = sorted(expected.keys() - clean.keys()), sorted(clean.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"export: state dict does not fit DiTConfig; missing {missing[:8]}, unexpected {unexpected[:8]}")
    wrong = [(k, tuple(clean[k].shape), s) for k, s in expected.items() if tuple(clean[k].shape) != s]
    if wrong:
        raise ValueError(f"export: shapes differ from DiTConfig (key, got, expected): {wrong[:8]}")
    return clean


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def export_diffusers(
    model_config: DiTConfig,
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    text_encoder: str,
    vae_checkpoint: str | None,
    schedule: ScheduleConfig = ScheduleConfig(),
    dtype: torch.dtype | None = None,
    latent_scale_factor: float | None = None,
) -> Path:
    """Write the diffusers folder for a DiT state dict (e.g. the EMA weights) and return its path.

    ``text_encoder``: the T5 hub id or local path the DiT was trained with. ``vae_checkpoint``: our
    VAE's checkpoint, or None when unknown. ``dtype`` casts the saved weights (None keeps them).
    """
    out = Path(out_dir)
    transformer = transformer_config(model_config)  # refuses what diffusers cannot load, before anything is written
    weights = _checked_state_dict(model_config, state_dict)
    weights = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous() for k, v in weights.items()}

    (out / "transformer").mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(out / "transformer" / "config.json", transformer)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(schedule))
    _write_json(out / "model_index.json", {
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        # Not stored here: pass them to from_pretrained (see vae/README.md and text_encoder/reference.json).
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "vae": [None, None],
    })
    _write_json(out / "text_encoder" / "reference.json", {
        "class": "transformers.T5EncoderModel",
        "tokenizer": "transformers.AutoTokenizer",
        "pretrained": text_encoder,
        "max_length": model_config.max_text_len,
        "padding": "max_length",
        "truncation": True,
    })
    _write_json(out / "vae" / "reference.json", {
        "format": "vidcurate trainer.models.vae.CausalVAE checkpoint (not diffusers AutoencoderKLCogVideoX)",
        "checkpoint": vae_checkpoint,
        "latent_channels": model_config.in_channels,
        "latent_scale_factor": latent_scale_factor,
        "latent_layout": "DiT latents are (B, T, C, H, W); decode latents / latent_scale_factor",
    })
    (out / "vae" / "README.md").write_text(
        "This DiT was trained on the latents of this project's causal 3D VAE (trainer/models/vae.py),\n"
        "not on diffusers' AutoencoderKLCogVideoX; its weights do not load into that class.\n"
        "reference.json names the checkpoint. Decode with the project's VAE after dividing the\n"
        "latents by latent_scale_factor, or build CogVideoXPipeline.from_pretrained(folder, vae=None,\n"
        "text_encoder=..., tokenizer=...) and call it with output_type='latent'.\n"
    )
    return out


__all__ = ["export_diffusers", "scheduler_config", "transformer_config"]
