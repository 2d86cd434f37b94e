"""Tiny randomly initialised stand-ins for the trainer's frozen encoders, saved like real weights.

Tests, the built-in sample run and machines without a model hub use these. They are loaded back
through exactly the code that loads real weights (``trainer.text.TextEncoder`` calls
``T5EncoderModel.from_pretrained`` and ``AutoTokenizer.from_pretrained`` on the folder), and the folder
holds a marker file (``standin.json``) that the loader reads, so every log line and checkpoint record
of a stand-in says so. Their outputs carry no meaning.

- text: a tiny T5 v1.1-style encoder (gated GELU, relative attention buckets) with a Unigram tokenizer
  trained here, with T5's special tokens (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) and T5's
  post-processor (``</s>`` appended).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

SEED = 0
MARKER = "standin.json"
"""Marker file inside a stand-in folder: ``{"standin": true, "description": ..., "recipe": ...}``."""

T5_REAL_ID = "google/t5-v1_1-xxl"
T5_STANDIN_DESCRIPTION = f"tiny random stand-in T5 (not {T5_REAL_ID})"

# T5's special-token layout, so ids mean the same as in the real tokenizer's first rows.
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
T5_VOCAB_SIZE = 256

# Training text for the stand-in tokenizer: caption-like words, so captions split into word pieces.
TOKENIZER_CORPUS = (
    "a video of a person walking along a city street at night with bright lights",
    "the camera pans slowly across a green field under a cloudy sky",
    "a close up shot of a cat sitting on a wooden table in warm light",
    "cars drive on a busy highway while the camera stays still",
    "a red car drives through snow past tall pine trees",
    "waves break on a sandy beach at sunset and birds fly over the water",
    "synthetic blobs drift over a colour gradient a grey disc on black",
)


def _t5_recipe(d_model: int, layers: int, heads: int) -> dict:
    import transformers

    return {
        "seed": SEED, "d_model": d_model, "layers": layers, "heads": heads, "vocab": T5_VOCAB_SIZE,
        "special": T5_SPECIAL_TOKENS, "corpus": TOKENIZER_CORPUS, "description": T5_STANDIN_DESCRIPTION,
        # Saved formats can change between library versions; rebuild rather than load a stale one.
        "transformers": transformers.__version__,
    }


def _build_t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE, special_tokens=list(T5_SPECIAL_TOKENS), unk_token="<unk>",
    )
    tok.train_from_iterator(list(TOKENIZER_CORPUS) * 4, trainer)
    eos = tok.token_to_id("</s>")
    # T5 appends </s> to every sequence (no BOS); padding to max_length comes after it.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512,
    )


def _build_t5(out: Path, d_model: int, layers: int, heads: int) -> None:
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer = _build_t5_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in T5_SPECIAL_TOKENS}
    if ids["<pad>"] != 0 or ids["</s>"] != 1:
        raise RuntimeError(f"stand-in T5 tokenizer: expected <pad>=0 and </s>=1 as in T5, got {ids}")
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
        num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",  # T5 v1.1's FFN
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        pad_token_id=ids["<pad>"], eos_token_id=ids["</s>"], decoder_start_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_t5_standin(out_dir: str | Path, *, d_model: int = 32, layers: int = 2, heads: int = 4) -> Path:
    """Build and save a tiny random T5 encoder + tokenizer in ``out_dir``; reuse it when already built
    with the same recipe. Returns the folder, to be given as ``[text] model``."""
    import torch

    if d_model % heads:
        raise ValueError(f"build_t5_standin: heads={heads} must divide d_model={d_model}")
    root = Path(out_dir).expanduser().resolve()
    recipe = _t5_recipe(d_model, layers, heads)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("recipe") == digest:
                return root
        except json.JSONDecodeError:
            pass  # a torn marker means a torn build: rebuild below
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise FileExistsError(f"stand-in out_dir {root}: expected an empty or stand-in directory, found other files")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a reader never sees a half-written directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        with torch.random.fork_rng():
            _build_t5(tmp, d_model, layers, heads)
        (tmp / MARKER).write_text(json.dumps(
            {"standin": True, "description": T5_STANDIN_DESCRIPTION, "recipe": digest, "spec": recipe}, indent=2,
        ))
        if root.exists():
            shutil.rmtree(root)  # empty, or a stand-in directory from another recipe (checked above)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished the same build first; use its result if it is complete.
            if not (marker.is_file() and json.loads(marker.read_text()).get("recipe") == digest):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def standin_description(folder: str | Path) -> str | None:
    """The stand-in's description when ``folder`` is a stand-in built here, else None."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    return str(info["description"]) if info.get("standin") else None


__all__ = ["MARKER", "T5_STANDIN_DESCRIPTION", "build_t5_standin", "standin_description"]
