"""The exported diffusers folder: what diffusers' own loaders make of it."""
from __future__ import annotations

import json

import pytest
import torch

from trainer import diffusion as D
from trainer.export import export_diffusers
from trainer.models.dit import DiT, dit_config

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = dit_config("tiny", pos_embed="sincos")
    torch.manual_seed(0)
    model = DiT(cfg)
    out = export_diffusers(cfg, model.state_dict(), tmp_path_factory.mktemp("export") / "out",
                           text_encoder="/models/tiny-t5", vae_checkpoint="/runs/vae/checkpoint_000100",
                           schedule=D.SCHEDULE_PRESETS["2b"], latent_scale_factor=1.15)
    return cfg, model, out


def test_scheduler_loads_with_the_training_schedule(folder):
    _, _, out = folder
    sched = diffusers.CogVideoXDDIMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    assert sched.config.snr_shift_scale == 3.0
    torch.testing.assert_close(sched.alphas_cumprod.double(), D.alphas_cumprod(D.SCHEDULE_PRESETS["2b"]),
                               atol=1e-6, rtol=0)


def test_pipeline_loads_transformer_and_scheduler_with_our_vae_and_encoder_left_out(folder):
    cfg, model, out = folder
    pipe = diffusers.CogVideoXPipeline.from_pretrained(out, vae=None, text_encoder=None, tokenizer=None)
    assert isinstance(pipe.transformer, diffusers.CogVideoXTransformer3DModel)
    assert isinstance(pipe.scheduler, diffusers.CogVideoXDDIMScheduler)
    loaded = pipe.transformer.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_folder_says_where_the_vae_and_text_encoder_are(folder):
    cfg, _, out = folder
    vae = json.loads((out / "vae" / "reference.json").read_text())
    assert vae["checkpoint"] == "/runs/vae/checkpoint_000100" and vae["latent_scale_factor"] == 1.15
    assert "not diffusers" in vae["format"] and "AutoencoderKLCogVideoX" in (out / "vae" / "README.md").read_text()
    text = json.loads((out / "text_encoder" / "reference.json").read_text())
    assert text["pretrained"] == "/models/tiny-t5" and text["max_length"] == cfg.max_text_len
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]


def test_export_casts_dtype_and_strips_wrapper_prefixes(tmp_path):
    cfg = dit_config("tiny")
    sd = {f"_orig_mod.{k}": v for k, v in DiT(cfg).state_dict().items()}
    out = export_diffusers(cfg, sd, tmp_path, text_encoder="t5", vae_checkpoint=None, dtype=torch.bfloat16)
    ref = diffusers.CogVideoXTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    assert ref.config.use_rotary_positional_embeddings is True


def test_export_rejects_a_state_dict_of_another_shape(tmp_path):
    sd = DiT(dit_config("tiny")).state_dict()
    with pytest.raises(ValueError, match="shapes differ"):
        export_diffusers(dit_config("tiny", text_dim=64), sd, tmp_path, text_encoder="t5", vae_checkpoint=None)
    sd.pop("proj_out.bias")
    with pytest.raises(ValueError, match="missing .*proj_out.bias"):
        export_diffusers(dit_config("tiny"), sd, tmp_path, text_encoder="t5", vae_checkpoint=None)
    assert not (tmp_path / "transformer").exists(), "nothing is written for a state dict that does not fit"


def test_export_refuses_a_guidance_distilled_student(tmp_path):
    cfg = dit_config("tiny", guidance_conditioning=True)  # diffusers' CogVideoX has no guidance input
    with pytest.raises(ValueError, match="guidance-distilled DiT"):
        export_diffusers(cfg, DiT(cfg).state_dict(), tmp_path, text_encoder="t5", vae_checkpoint=None)
    assert not (tmp_path / "transformer").exists()
