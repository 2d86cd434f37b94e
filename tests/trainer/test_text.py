"""Frozen T5 text encoder (tiny stand-in through the real from_pretrained path) and caption dropout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.standins import MARKER, T5_STANDIN_DESCRIPTION, build_t5_standin
from trainer.text import (
    CaptionDropout,
    TextConfig,
    TextEncoder,
    apply_caption_dropout,
    caption_dropout_mask,
    dropout_generator,
)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_t5_standin(tmp_path_factory.mktemp("t5") / "t5-standin")


@pytest.fixture(scope="module")
def encoder(standin: Path) -> TextEncoder:
    return TextEncoder(TextConfig(model=str(standin)))


def test_standin_is_saved_as_a_t5_folder_and_rebuilt_only_when_missing(standin: Path) -> None:
    names = {p.name for p in standin.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    assert json.loads((standin / "config.json").read_text())["model_type"] == "t5"
    before = (standin / "model.safetensors").stat().st_mtime_ns
    assert build_t5_standin(standin) == standin
    assert (standin / "model.safetensors").stat().st_mtime_ns == before


def test_standin_is_named_in_the_log_line_and_the_record(standin: Path, capsys: pytest.CaptureFixture) -> None:
    enc = TextEncoder(TextConfig(model=str(standin)))
    line = capsys.readouterr().out
    assert T5_STANDIN_DESCRIPTION in line and "not google/t5-v1_1-xxl" in line
    assert enc.is_standin
    rec = enc.record()
    assert rec["standin"] is True and "stand-in" in rec["description"] and rec["max_length"] == 226


def test_a_t5_folder_without_the_marker_is_not_called_a_standin(standin: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    plain = tmp_path / "plain-t5"
    T5EncoderModel.from_pretrained(standin).save_pretrained(plain)
    AutoTokenizer.from_pretrained(standin).save_pretrained(plain)
    enc = TextEncoder(TextConfig(model=str(plain)))
    assert not enc.is_standin and "stand-in" not in enc.describe()


def test_missing_model_fails_without_downloading(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no downloads at run time"):
        TextEncoder(TextConfig(model=str(tmp_path / "nothing-here")))


def test_captions_give_226_tokens_with_eos_and_a_padding_mask(encoder: TextEncoder) -> None:
    captions = ["a red car drives through snow", "", "waves " * 400]
    ids, mask = encoder.tokenize(captions)
    assert ids.shape == mask.shape == (3, 226)
    eos, pad = encoder.tokenizer.eos_token_id, encoder.tokenizer.pad_token_id
    n = int(mask[0].sum())
    assert 2 < n < 226 and ids[0, n - 1] == eos and (ids[0, n:] == pad).all() and (mask[0, n:] == 0).all()
    assert int(mask[1].sum()) == 1 and ids[1, 0] == eos  # the empty prompt is just </s>
    assert int(mask[2].sum()) == 226 and ids[2, -1] == eos  # truncated, </s> kept last

    emb, m = encoder.encode(captions)
    assert emb.shape == (3, 226, encoder.dim) and emb.dtype == torch.float32
    assert m.dtype == torch.bool and torch.equal(m, mask.bool())


def test_different_captions_give_different_embeddings(encoder: TextEncoder) -> None:
    emb, _ = encoder.encode(["a red car drives through snow", "a cat sitting on a wooden table",
                             "a red car drives through snow"])
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)
    assert torch.equal(emb[0], emb[2])
    # Without a mask the padding positions see the caption too (as in CogVideoX): they differ as well.
    assert not torch.allclose(emb[0, -1], emb[1, -1], atol=1e-5)


def test_empty_prompt_embedding_is_computed_once_and_matches_encoding_empty(encoder: TextEncoder) -> None:
    e1, m1 = encoder.empty()
    e2, _ = encoder.empty()
    assert e1 is e2 and e1.shape == (226, encoder.dim) and int(m1.sum()) == 1
    direct, _ = encoder.encode([""])
    assert torch.equal(direct[0], e1)


def test_dropout_rate_and_dropped_rows_equal_the_empty_prompt(encoder: TextEncoder) -> None:
    empty, empty_mask = encoder.empty()
    drop = CaptionDropout(0.1, empty, empty_mask, seed=7)
    emb, mask = encoder.encode(["a red car drives through snow", "a cat on a table"])
    emb, mask = emb.repeat(250, 1, 1), mask.repeat(250, 1)  # 500 rows
    total, dropped_rows = 0, 0
    for step in range(20):  # 10,000 draws: 0.1 +- 0.009 at 3 sigma
        out, out_mask, dropped = drop(emb, mask, step=step, rank=0)
        total += dropped.numel()
        dropped_rows += int(dropped.sum())
        assert torch.equal(out[dropped], empty.expand(int(dropped.sum()), -1, -1))
        assert torch.equal(out_mask[dropped], empty_mask.expand(int(dropped.sum()), -1))
        assert torch.equal(out[~dropped], emb[~dropped]) and torch.equal(out_mask[~dropped], mask[~dropped])
    assert 0.09 < dropped_rows / total < 0.11


def test_dropout_draw_is_a_function_of_seed_step_and_rank() -> None:
    a = caption_dropout_mask(1000, 0.5, dropout_generator(1, 5, 0))
    assert torch.equal(a, caption_dropout_mask(1000, 0.5, dropout_generator(1, 5, 0)))
    assert not torch.equal(a, caption_dropout_mask(1000, 0.5, dropout_generator(1, 5, 1)))
    assert not torch.equal(a, caption_dropout_mask(1000, 0.5, dropout_generator(1, 6, 0)))
    assert not caption_dropout_mask(1000, 0.0, dropout_generator(1, 5, 0)).any()


def test_dropout_rejects_an_empty_embedding_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"\(L, D\)"):
        apply_caption_dropout(torch.zeros(2, 226, 8), torch.ones(2, 226), torch.zeros(226, 4), torch.ones(226),
                              torch.tensor([True, False]))


def test_text_config_checks_its_values() -> None:
    with pytest.raises(ValueError, match="dropout"):
        TextConfig(dropout=1.0)
    with pytest.raises(ValueError, match="dtype"):
        TextConfig(dtype="int8")
    assert TextConfig().torch_dtype(torch.device("cpu")) == torch.float32
    assert TextConfig().torch_dtype(torch.device("cuda")) == torch.bfloat16
