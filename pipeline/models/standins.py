"""Tiny randomly initialised stand-ins for every neural model, saved like real weights.

Tests, the built-in sample run and machines without a model hub use these. They are loaded back
through exactly the code that loads real weights (``load_watermark``, ``load_aesthetic``,
``load_clip_similarity``, ``load_captioner``), and their model ids start with ``standin:`` so every
score and caption they produce says it came from a stand-in. Their outputs carry no meaning.

- watermark: the real detector architecture (timm efficientnet_b3 + LAION head), random weights.
- CLIP: a tiny open_clip architecture (embed_dim 768, so the aesthetic head keeps its published
  shape) described by a model-config JSON that the loader registers with ``open_clip.add_model_config``.
- aesthetic: the published MLP shape, random weights.
- captioner: a tiny Qwen2-VL with a byte-level BPE tokenizer trained here, saved with
  ``save_pretrained`` together with its processor (image + video) and chat template.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.models import MODEL_ID_KEY, save_state_dict_file

if TYPE_CHECKING:
    from pipeline.models.captioner import CaptionConfig

SEED = 0
MARKER = "standins.json"

WATERMARK_ID = "standin:laion-watermark-efficientnet_b3-random"
CLIP_ID = "standin:open_clip-tiny-random"
AESTHETIC_MLP_ID = "standin:aesthetic-mlp-random"
CAPTIONER_ID = "standin:qwen2-vl-tiny-random"

CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    # open_clip's bundled BPE tokenizer has 49408 tokens, so the vocabulary keeps that size.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_NAME = "standin-clip-tiny"

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
# The Qwen2-VL chat layout, reduced to what a captioning prompt needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# initializer_range 0.5 (not the usual 0.02): with tiny random weights at 0.02 the prompt swamps
# the pixels and every clip gets the same caption, which would hide clip/caption mix-ups in tests.
CAPTIONER_SPEC: dict[str, Any] = {
    "text": {"initializer_range": 0.5, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096,
             # head_dim 8 → 4 rotary pairs split over (t, h, w).
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}},
    "vision": {"initializer_range": 0.5, "depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "min_pixels": 56 * 56,
    "max_pixels": 112 * 112,
    "vocab_size": 400,
}
# Training text for the stand-in tokenizer: caption-like words so stand-in captions look like words.
TOKENIZER_CORPUS = (
    "a video of a person walking along a city street at night with bright lights",
    "the camera pans slowly across a green field under a cloudy sky",
    "a close up shot of a cat sitting on a wooden table in warm light",
    "cars drive on a busy highway while the camera stays still",
    "describe this video in detail the main subjects the setting the camera motion and the style",
    "waves break on a sandy beach at sunset and birds fly over the water",
)


@dataclass(frozen=True)
class Standins:
    """Where the stand-ins live; pass these straight to the ``load_*`` functions."""

    root: Path
    watermark: str
    """State dict (.safetensors) for ``load_watermark``."""
    clip_model: str
    """open_clip model-config JSON for ``clip_model=``."""
    clip_pretrained: str
    """open_clip checkpoint (.safetensors) for ``clip_pretrained=``."""
    aesthetic_mlp: str
    """State dict (.safetensors) for ``load_aesthetic(mlp=...)``."""
    captioner: str
    """``save_pretrained`` directory for ``CaptionConfig(model=...)``."""

    def caption_config(self, **overrides: Any) -> CaptionConfig:
        """A ``CaptionConfig`` for the stand-in captioner, small enough for CPU tests."""
        from pipeline.models.captioner import CaptionConfig

        kwargs: dict[str, Any] = {"model": self.captioner, "max_new_tokens": 12, "image_max_side": 64, "batch_size": 4}
        kwargs.update(overrides)
        return CaptionConfig(**kwargs)


def _recipe_hash() -> str:
    import open_clip
    import timm
    import transformers

    recipe = {
        "seed": SEED, "clip": CLIP_CONFIG, "captioner": CAPTIONER_SPEC, "corpus": TOKENIZER_CORPUS,
        "special": SPECIAL_TOKENS, "template": CHAT_TEMPLATE,
        "ids": [WATERMARK_ID, CLIP_ID, AESTHETIC_MLP_ID, CAPTIONER_ID],
        # Saved formats can change between library versions; rebuild rather than load a stale one.
        "versions": [timm.__version__, open_clip.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _paths(root: Path) -> Standins:
    return Standins(
        root=root,
        watermark=str(root / "watermark.safetensors"),
        clip_model=str(root / f"{CLIP_NAME}.json"),
        clip_pretrained=str(root / "clip.safetensors"),
        aesthetic_mlp=str(root / "aesthetic_mlp.safetensors"),
        captioner=str(root / "captioner"),
    )


def _build_watermark(path: Path) -> None:
    from pipeline.models.watermark import build_watermark_net

    save_state_dict_file(build_watermark_net().state_dict(), path, model_id=WATERMARK_ID)


def _build_clip(config_path: Path, weights_path: Path) -> None:
    import open_clip

    config_path.write_text(json.dumps(CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config_path)
    model = open_clip.create_model(config_path.stem, pretrained=None)
    save_state_dict_file(model.state_dict(), weights_path, model_id=CLIP_ID)


def _build_aesthetic(path: Path) -> None:
    from pipeline.models.aesthetic import AestheticMLP

    save_state_dict_file(AestheticMLP().state_dict(), path, model_id=AESTHETIC_MLP_ID)


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CAPTIONER_SPEC["vocab_size"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(TOKENIZER_CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # Qwen2VLProcessor reads these attributes to find its placeholder tokens.
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def _build_captioner(out: Path) -> None:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            **CAPTIONER_SPEC["text"],
            "vocab_size": len(tokenizer),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=CAPTIONER_SPEC["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    setattr(config, MODEL_ID_KEY, CAPTIONER_ID)
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    # A trained chat model never emits its prompt-structure tokens; keep the random one from it too.
    model.generation_config.suppress_tokens = [
        ids[t] for t in SPECIAL_TOKENS if t not in ("<|im_end|>",)
    ]
    pixels = {"min_pixels": CAPTIONER_SPEC["min_pixels"], "max_pixels": CAPTIONER_SPEC["max_pixels"]}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_standins(out_dir: str | Path) -> Standins:
    """Build and save every stand-in under ``out_dir``; reuse it when already built with the same recipe."""
    import torch

    root = Path(out_dir).expanduser().resolve()
    digest = _recipe_hash()
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("recipe") == digest:
                return _paths(root)
        except json.JSONDecodeError:
            pass  # a torn marker means a torn build: rebuild below
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise FileExistsError(f"stand-in out_dir {root}: expected an empty or stand-in directory, found other files")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a reader never sees a half-written directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        fork = torch.random.fork_rng()
        with fork:
            torch.manual_seed(SEED)
            paths = _paths(tmp)
            _build_watermark(Path(paths.watermark))
            _build_clip(Path(paths.clip_model), Path(paths.clip_pretrained))
            _build_aesthetic(Path(paths.aesthetic_mlp))
            _build_captioner(Path(paths.captioner))
        (tmp / MARKER).write_text(json.dumps({"recipe": digest, "paths": {
            k: os.path.relpath(v, tmp) for k, v in dataclasses.asdict(paths).items() if k != "root"
        }}, indent=2))
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
    return _paths(root)
