from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.models import ModelLoadError
from pipeline.models.watermark import (
    INPUT_SIZE,
    build_watermark_net,
    load_watermark,
    preprocess_watermark,
)


@pytest.fixture(scope="module")
def standin_watermark(standins):
    return load_watermark(standins.watermark)


def test_architecture_is_the_published_laion_detector():
    net = build_watermark_net()
    head = net.classifier
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1536, 625), (625, 256), (256, 2)]
    assert head[2].p == pytest.approx(0.3)
    assert net.num_features == 1536
    # The released watermark_model_v1.pt uses these keys; a renamed module would not load it.
    keys = set(net.state_dict())
    assert {"conv_stem.weight", "classifier.0.weight", "classifier.3.weight", "classifier.5.bias"} <= keys


def test_preprocessing_squashes_without_cropping_and_normalises():
    frames = np.zeros((2, 100, 400, 3), dtype=np.uint8)
    frames[:, :, :100] = 255  # left quarter white: a centre crop would cut it away
    x = preprocess_watermark(frames)
    assert x.shape == (2, 3, INPUT_SIZE, INPUT_SIZE)
    white = (1 - 0.485) / 0.229
    black = (0 - 0.485) / 0.229
    quarter = INPUT_SIZE // 4
    assert torch.allclose(x[:, 0, :, : quarter - 2], torch.tensor(white), atol=1e-4)
    assert torch.allclose(x[:, 0, :, quarter + 2:], torch.tensor(black), atol=1e-4)


def test_probs_are_per_frame_probabilities(standin_watermark, make_clip):
    frames = make_clip(2, 90, 160, seed=1)
    frames.setflags(write=False)  # batches from Arrow arrive read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = standin_watermark.probs(frames)
    assert probs.shape == (2,)
    assert probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    single = standin_watermark.probs(frames[1])  # one (H, W, 3) image
    assert single.shape == (1,)
    assert single[0] == pytest.approx(probs[1], abs=1e-5)
    assert standin_watermark.model_id.startswith("standin:")


def test_softmax_index_zero_is_watermark(tmp_path, make_clip):
    net = build_watermark_net()
    last = net.classifier[5]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([4.0, -4.0]))  # logits favour class 0
    torch.save(net.state_dict(), tmp_path / "wm.pt")
    probs = load_watermark(str(tmp_path / "wm.pt")).probs(make_clip(1, 64, 64, seed=2))
    assert np.allclose(probs, torch.tensor([4.0, -4.0]).softmax(0)[0].item(), atol=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip_gives_the_same_outputs(tmp_path, make_clip, suffix):
    torch.manual_seed(3)
    net = build_watermark_net().eval()
    path = tmp_path / f"wm{suffix}"
    if suffix == ".pt":
        torch.save(net.state_dict(), path)  # the format of the released LAION weights
    else:
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(path))
    frames = make_clip(1, 72, 128, seed=4)
    with torch.no_grad():
        expected = net(preprocess_watermark(frames)).softmax(-1)[:, 0].numpy()
    model = load_watermark(str(path))
    np.testing.assert_allclose(model.probs(frames), expected, rtol=1e-5, atol=1e-6)
    assert model.model_id == str(path)  # real weights are named by their source


def test_wrong_weights_fail_naming_the_problem(tmp_path, standins):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_watermark(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="missing keys"):
        load_watermark(standins.aesthetic_mlp)
    net = build_watermark_net()
    net.classifier[5] = nn.Linear(256, 3)
    torch.save(net.state_dict(), tmp_path / "three_classes.pt")
    with pytest.raises(ModelLoadError, match="shapes do not fit"):
        load_watermark(str(tmp_path / "three_classes.pt"))


def test_hub_source_offline_names_the_source(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    source = "hf://kiriyamaX/laion-watermark/watermark_model_v1.pt"
    with pytest.raises(ModelLoadError, match="kiriyamaX/laion-watermark/watermark_model_v1.pt.*not in the Hugging Face cache"):
        load_watermark(source)
    with pytest.raises(ModelLoadError, match="expected hf://owner/repo/filename"):
        load_watermark("hf://just-a-repo")


def test_bad_frames_are_rejected(standin_watermark):
    with pytest.raises(ValueError, match="expected dtype uint8, got float32"):
        standin_watermark.probs(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(N>=1, H, W, 3\), got \(1, 8, 8, 4\)"):
        standin_watermark.probs(np.zeros((1, 8, 8, 4), dtype=np.uint8))
