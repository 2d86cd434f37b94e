from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.models import ModelLoadError
from pipeline.models.aesthetic import (
    DEFAULT_MLP,
    AestheticMLP,
    AestheticModel,
    load_aesthetic,
    load_aesthetic_mlp,
)
from pipeline.models.clipsim import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, load_clip, load_clip_similarity


@pytest.fixture(scope="module")
def standin_aesthetic(standins):
    return load_aesthetic(standins.clip_model, standins.clip_pretrained, standins.aesthetic_mlp)


def test_head_is_the_published_mlp():
    layers = AestheticMLP().layers
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in layers if isinstance(m, nn.Dropout)] == pytest.approx([0.2, 0.2, 0.1])
    assert all(isinstance(m, (nn.Linear, nn.Dropout)) for m in layers), "the published head has no activations"
    # Keys of the released sac+logos+ava1-l14-linearMSE.pth.
    assert set(AestheticMLP().state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_head_is_affine_in_eval():
    torch.manual_seed(0)
    mlp = AestheticMLP().eval()
    x, y = torch.randn(3, 768), torch.randn(3, 768)
    with torch.no_grad():
        mixed = mlp(0.3 * x + 0.7 * y)
        expected = 0.3 * mlp(x) + 0.7 * mlp(y)
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-5)


def test_default_clip_is_openai_vit_l14_with_quickgelu():
    import open_clip

    assert (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED) in open_clip.list_pretrained()
    cfg = open_clip.get_model_config(DEFAULT_CLIP_MODEL)
    assert cfg["quick_gelu"] is True
    assert cfg["embed_dim"] == 768
    assert (cfg["vision_cfg"]["layers"], cfg["vision_cfg"]["width"], cfg["vision_cfg"]["patch_size"]) == (24, 1024, 14)


def test_scores_are_finite_per_frame_and_follow_the_head(standin_aesthetic, make_clip):
    frames = make_clip(3, 96, 160, seed=5)
    scores = standin_aesthetic.scores(frames)
    assert scores.shape == (3,)
    assert scores.dtype == np.float32
    assert np.all(np.isfinite(scores))
    emb = standin_aesthetic.embed(frames)
    assert emb.shape == (3, 768)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        expected = standin_aesthetic.mlp(torch.from_numpy(emb))[:, 0].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert standin_aesthetic.model_id.startswith("standin:")


def test_mlp_round_trip_from_a_torch_state_dict(tmp_path):
    torch.manual_seed(1)
    mlp = AestheticMLP().eval()
    torch.save(mlp.state_dict(), tmp_path / "head.pth")  # the released format
    loaded, head_id = load_aesthetic_mlp(str(tmp_path / "head.pth"))
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), mlp(x))
    assert head_id.endswith("head.pth")


def test_clip_checkpoint_round_trip(standins, standin_aesthetic, make_clip):
    import open_clip

    frames = make_clip(2, 80, 80, seed=6)
    # An independent open_clip load of the same files gives the same embeddings.
    from PIL import Image

    from pipeline.models.standins import CLIP_NAME

    # standin_aesthetic registered the stand-in config with open_clip under CLIP_NAME.
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_NAME, pretrained=standins.clip_pretrained)

    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([preprocess(Image.fromarray(f)) for f in frames]))
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(standin_aesthetic.embed(frames), ref, rtol=1e-4, atol=1e-5)


def test_clip_is_shared_with_caption_qa(standins, standin_aesthetic):
    sim = load_clip_similarity(standins.clip_model, standins.clip_pretrained)
    assert sim.backbone is standin_aesthetic.backbone


def test_embedding_size_mismatch_is_an_error(standins):
    backbone = load_clip(standins.clip_model, standins.clip_pretrained)
    with pytest.raises(ModelLoadError, match="expects 512-d CLIP embeddings.*gives 768-d"):
        AestheticModel(backbone, AestheticMLP(input_size=512), model_id="x")


def test_missing_weights_are_clear_errors(monkeypatch, tmp_path, standins):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="improved-aesthetic-predictor.*not in the Hugging Face cache"):
        load_aesthetic(standins.clip_model, standins.clip_pretrained, DEFAULT_MLP)
    with pytest.raises(ModelLoadError, match="not an open_clip model name"):
        load_aesthetic("ViT-Nope", standins.clip_pretrained, standins.aesthetic_mlp)
    with pytest.raises(ModelLoadError, match="looks like a path but no such file"):
        load_aesthetic(standins.clip_model, str(tmp_path / "nope.safetensors"), standins.aesthetic_mlp)
    with pytest.raises(ModelLoadError, match="expected key 'layers.0.weight'"):
        load_aesthetic_mlp(standins.watermark)
