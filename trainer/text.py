"""Frozen T5 text encoder and caption dropout for the DiT (DESIGN.md section 5).

CogVideoX conditions on T5 v1.1 XXL encoder states: the caption is tokenised with ``</s>`` appended,
padded with ``<pad>`` to exactly 226 tokens and truncated there (``padding="max_length",
truncation=True``), and the encoder runs on the ids *without* an attention mask (SAT's
FrozenT5Embedder and diffusers' CogVideoX pipeline both call it with ids only), so the DiT sees the
encoder's states at the padding positions too. The mask is still returned, for a DiT that wants it and
for the precomputed ``text`` members; ``use_attention_mask = true`` passes it to the encoder instead.

Caption dropout (classifier-free guidance): with probability ``dropout`` (CogVideoX's ``ucg_rate`` 0.1)
a sample's caption embedding is replaced by the empty-prompt ("") embedding, computed once. SAT zeroes
the dropped embedding instead; the empty prompt is what diffusers' pipeline feeds as the unconditional
branch at sampling time, so training on it keeps training and sampling the same.

Models load with ``from_pretrained(..., local_files_only=True)``: a local folder or an id already in
the Hugging Face cache, never a download. A stand-in folder (``trainer.standins.build_t5_standin``)
loads through the same path and is named as such by ``describe()``, in every log line and in
``record()``, which the checkpoint stores.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.standins import standin_description

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True, slots=True)
class TextConfig:
    model: str = "google/t5-v1_1-xxl"
    """Hub id (already in the local cache) or folder holding a T5 encoder and its tokenizer."""
    max_length: int = 226
    """Tokens per caption after padding/truncation (CogVideoX: 226)."""
    dropout: float = 0.1
    """Probability per sample of replacing the caption with the empty prompt (CogVideoX: 0.1)."""
    dtype: str = "auto"
    """"auto" = bfloat16 on CUDA, float32 on CPU; or "float32", "bfloat16", "float16"."""
    use_attention_mask: bool = False
    """Pass the padding mask to the encoder; CogVideoX does not (False)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("TextConfig.model: expected a hub id or a folder, got an empty string")
        if self.max_length < 2:
            raise ValueError(f"TextConfig.max_length: expected >= 2 (a token and </s>), got {self.max_length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TextConfig.dropout: expected a probability in [0, 1), got {self.dropout}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"TextConfig.dtype: expected 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


class TextEncoder:
    """Frozen T5 encoder: captions -> (embeddings (B, L, D), mask (B, L)) with L = ``max_length``."""

    def __init__(self, cfg: TextConfig, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = cfg.torch_dtype(self.device)
        standin = standin_description(cfg.model) if Path(cfg.model).is_dir() else None
        self.is_standin = standin is not None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
            model = T5EncoderModel.from_pretrained(cfg.model, local_files_only=True, dtype=self.dtype)
        except OSError as e:
            raise OSError(
                f"text.model: expected a local folder or an already-cached hub id of a T5 encoder with its "
                f"tokenizer, got {cfg.model!r} (no downloads at run time; trainer.standins.build_t5_standin "
                f"builds a tiny stand-in): {e}"
            ) from e
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = int(self.model.config.d_model)
        self._description = (
            f"{standin} from {cfg.model}, D={self.dim}" if standin
            else f"T5 encoder {cfg.model}, D={self.dim}"
        )
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None
        print(f"[text] loaded {self.describe()} ({self.dtype}, {cfg.max_length} tokens, dropout {cfg.dropout})")

    def describe(self) -> str:
        """What was loaded, naming a stand-in as one: goes into every log line about the encoder."""
        return self._description

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores about its text encoder."""
        return {
            "model": self.cfg.model, "standin": self.is_standin, "description": self.describe(),
            "max_length": self.cfg.max_length, "dim": self.dim, "dropout": self.cfg.dropout,
            "use_attention_mask": self.cfg.use_attention_mask, "dtype": str(self.dtype),
        }

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids and mask, each (B, L) int64, padded and truncated to L = max_length as CogVideoX does."""
        enc = self.tokenizer(
            list(captions), padding="max_length", max_length=self.cfg.max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> embeddings (B, L, D) in the encoder dtype and mask (B, L) bool, on ``device``."""
        if isinstance(captions, str):
            raise TypeError("TextEncoder.encode: expected a list of captions, got one string")
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask if self.cfg.use_attention_mask else None)
        return out.last_hidden_state, mask.bool()  # (B, L, D), (B, L)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embedding (L, D) and mask (L,), computed once."""
        if self._empty is None:
            emb, mask = self.encode([""])
            self._empty = (emb[0], mask[0])
        return self._empty


# ---------------------------------------------------------------------------------------------
# Caption dropout for classifier-free guidance
# ---------------------------------------------------------------------------------------------


def dropout_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator that is a pure function of (seed, step, rank): a resumed run drops the same captions
    without restoring any RNG state."""
    digest = hashlib.sha256(f"caption-dropout:{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def caption_dropout_mask(batch_size: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) bool: True where the caption is dropped, each with probability ``p``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"caption dropout: expected a probability in [0, 1), got {p}")
    return torch.rand(batch_size, generator=generator) < p


def apply_caption_dropout(
    embedding: torch.Tensor, mask: torch.Tensor, empty_embedding: torch.Tensor, empty_mask: torch.Tensor,
    dropped: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows where ``dropped`` (B,) is True take the empty prompt's embedding (L, D) and mask (L,)."""
    # embedding: (B, L, D); mask: (B, L)
    if embedding.shape[1:] != empty_embedding.shape:
        raise ValueError(
            f"caption dropout: expected the empty embedding to have the captions' (L, D) = "
            f"{tuple(embedding.shape[1:])}, got {tuple(empty_embedding.shape)}"
        )
    d = dropped.to(embedding.device)
    emb = torch.where(d[:, None, None], empty_embedding.to(embedding)[None], embedding)  # (B, L, D)
    m = torch.where(d[:, None], empty_mask.to(mask)[None], mask)  # (B, L)
    return emb, m


class CaptionDropout:
    """Replaces each caption's embedding by the empty prompt's with probability ``p``."""

    def __init__(self, p: float, empty_embedding: torch.Tensor, empty_mask: torch.Tensor, seed: int) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"caption dropout: expected a probability in [0, 1), got {p}")
        self.p = p
        self.empty_embedding = empty_embedding  # (L, D)
        self.empty_mask = empty_mask  # (L,)
        self.seed = seed

    @classmethod
    def from_encoder(cls, encoder: TextEncoder, seed: int) -> CaptionDropout:
        emb, mask = encoder.empty()
        return cls(encoder.cfg.dropout, emb, mask, seed)

    def __call__(self, embedding: torch.Tensor, mask: torch.Tensor, *, step: int, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding (B, L, D), mask (B, L), dropped (B,) bool) for this step and rank."""
        dropped = caption_dropout_mask(embedding.shape[0], self.p, dropout_generator(self.seed, step, rank))
        emb, m = apply_caption_dropout(embedding, mask, self.empty_embedding, self.empty_mask, dropped)
        return emb, m, dropped


__all__ = [
    "CaptionDropout", "TextConfig", "TextEncoder", "apply_caption_dropout", "caption_dropout_mask",
    "dropout_generator",
]
