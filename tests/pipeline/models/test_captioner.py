from __future__ import annotations

import numpy as np
import pytest

from catalog.config import ConfigError, load_section
from pipeline.models import ModelLoadError
from pipeline.models.captioner import (
    CaptionConfig,
    CaptionResult,
    fit_max_side,
    load_captioner,
    sample_frames,
)


@pytest.fixture(scope="module")
def clips(make_clip):
    # An image, videos of different lengths and orientations.
    return [
        make_clip(1, 48, 64, seed=20),
        make_clip(6, 64, 48, seed=21),
        make_clip(5, 48, 64, seed=22),
        make_clip(3, 40, 72, seed=23),
    ]


@pytest.fixture(scope="module")
def one_by_one(standins, clips):
    captioner = load_captioner(standins.caption_config(batch_size=1))
    return [captioner.caption([c])[0] for c in clips]


def test_config_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[caption]\nbackend = "openai"\nmodel = "Qwen/Qwen2-VL-7B-Instruct"\nconcurrency = 8\ntimeout_s = 30\n')
    cfg = load_section(CaptionConfig, path, "caption")
    assert (cfg.backend, cfg.model, cfg.concurrency, cfg.timeout_s) == ("openai", "Qwen/Qwen2-VL-7B-Instruct", 8, 30.0)
    path.write_text('[caption]\nmax_tokens = 10\n')
    with pytest.raises(ConfigError, match="'max_tokens'"):
        load_section(CaptionConfig, path, "caption")
    with pytest.raises(ValueError, match="caption.backend: expected one of .*got 'vllm'"):
        CaptionConfig(backend="vllm")
    with pytest.raises(ValueError, match="temperature: expected > 0 when do_sample"):
        CaptionConfig(do_sample=True, temperature=0.0)


def test_sample_frames_spreads_over_the_clip():
    frames = np.arange(20, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3)  # frame i has value i
    picked = sample_frames(frames, 8)[:, 0, 0, 0].tolist()
    assert len(picked) == 8
    assert picked[0] == 0 and picked[-1] == 19
    assert picked == sorted(picked)
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1
    assert sample_frames(frames[:5], 8).shape[0] == 5


def test_fit_max_side_keeps_aspect_and_never_upscales():
    frames = np.zeros((2, 216, 384, 3), dtype=np.uint8)
    assert fit_max_side(frames, 192).shape == (2, 108, 192, 3)
    assert fit_max_side(frames, 1000).shape == (2, 216, 384, 3)


def test_one_nonempty_caption_per_clip(one_by_one, standins):
    cfg = standins.caption_config()
    assert len(one_by_one) == 4
    for result in one_by_one:
        assert isinstance(result, CaptionResult)
        assert result.caption.strip()
        assert result.model.startswith("standin:")
        assert 1 <= result.tokens <= cfg.max_new_tokens
        assert result.latency_s > 0


def test_batched_captions_come_back_in_input_order(standins, clips, one_by_one):
    expected = [r.caption for r in one_by_one]
    assert len(set(expected)) == 4, "clips must caption differently for the order check to mean anything"
    # Batches of 3: the image goes alone, the videos in one call; results must still line up.
    captioner = load_captioner(standins.caption_config(batch_size=3))
    assert [r.caption for r in captioner.caption(clips)] == expected
    # Reversed input, reversed output: captions follow their clips, not their positions.
    assert [r.caption for r in captioner.caption(clips[::-1])] == expected[::-1]


def test_frames_as_images(standins, clips):
    captioner = load_captioner(standins.caption_config(frames_as="images", num_frames=2))
    results = captioner.caption(clips[:2])
    assert len(results) == 2
    assert all(r.caption.strip() and r.tokens >= 1 for r in results)


def test_model_id_and_load_errors(standins, tmp_path):
    assert load_captioner(standins.caption_config()).model_id.startswith("standin:")
    with pytest.raises(ModelLoadError, match="caption.model .*could not load"):
        load_captioner(CaptionConfig(model=str(tmp_path / "no-such-model")))
