from __future__ import annotations

import numpy as np
import pytest

from pipeline.models.clipsim import load_clip_similarity


@pytest.fixture(scope="module")
def sim(standins):
    return load_clip_similarity(standins.clip_model, standins.clip_pretrained)


def test_similarity_is_mean_per_frame_cosine(sim, make_clip):
    frames = make_clip(3, 64, 96, seed=7)
    text = "a dog runs across a beach"
    images = sim.backbone.embed_images(frames).numpy()  # (3, 768)
    caption = sim.backbone.embed_texts([text]).numpy()[0]  # (768,)
    expected = float(np.mean(images @ caption))
    assert sim.similarity(frames, text) == pytest.approx(expected, abs=1e-5)
    assert -1.0 <= sim.similarity(frames, text) <= 1.0


def test_batch_keeps_clip_text_pairs_in_order(sim, make_clip):
    a, b = make_clip(2, 64, 64, seed=8), make_clip(1, 48, 80, seed=9)
    texts = ["a red car", "an old man reading a newspaper in a park"]
    singles = [sim.similarity(a, texts[0]), sim.similarity(b, texts[1])]
    assert len({round(s, 6) for s in singles}) == 2, "pairs must differ for the order check to mean anything"
    batch = sim.similarities([a, b], texts)
    assert batch.shape == (2,)
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    np.testing.assert_allclose(sim.similarities([b, a], texts[::-1]), singles[::-1], atol=1e-5)


def test_long_captions_are_truncated_not_rejected(sim, make_clip):
    long_text = " ".join(["the camera slowly pans over a quiet harbour at dawn"] * 30)
    assert np.isfinite(sim.similarity(make_clip(1, 32, 32, seed=10), long_text))


def test_bad_inputs(sim, make_clip):
    clip = make_clip(1, 32, 32, seed=11)
    with pytest.raises(ValueError, match="expected a non-empty caption"):
        sim.similarity(clip, "   ")
    with pytest.raises(ValueError, match="one text per clip, got 1 clips and 2 texts"):
        sim.similarities([clip], ["a", "b"])
    assert sim.similarities([], []).shape == (0,)
    assert sim.model_id.startswith("standin:")
