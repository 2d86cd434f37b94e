"""Video captioners: a local image/video-text-to-text model, or an OpenAI-compatible server (vLLM).

Both backends take a batch of clips (each RGB ``uint8`` ``(N, H, W, 3)``), sample at most
``num_frames`` evenly spaced frames per clip, shrink them to ``image_max_side``, and return one
:class:`CaptionResult` per clip in input order. Config: the ``[caption]`` TOML section.
"""
from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.models import MODEL_ID_KEY, ModelLoadError, check_frames

DEFAULT_PROMPT = (
    "Describe this video in detail: the main subjects and what they do, the setting, "
    "the camera motion, the lighting and the visual style. Answer in one paragraph."
)
BACKENDS = ("transformers", "openai")
FRAMES_AS = ("video", "images")
# Status codes worth another try: the server is overloaded, restarting or rate limiting.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class CaptionError(RuntimeError):
    """A clip could not be captioned (server error after the last retry, malformed response...)."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class CaptionResult:
    caption: str
    """The generated text, stripped; empty when the model stopped at once (a reason to reject, not an error)."""
    model: str
    """Id of the model that wrote it (``standin:...`` for stand-ins)."""
    tokens: int
    """Generated tokens, end-of-sequence and padding excluded."""
    latency_s: float
    """Wall time of the call that produced it: the batched ``generate`` call, or the HTTP request with its retries."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CaptionConfig:
    backend: str = "transformers"
    """``"transformers"`` (local model) or ``"openai"`` (OpenAI-compatible ``/v1/chat/completions``, e.g. vLLM)."""
    model: str = "Qwen/Qwen2-VL-2B-Instruct"
    """transformers: local directory or hub id; openai: the served model name."""
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 256
    temperature: float = 0.0
    """Used only when ``do_sample``; greedy decoding otherwise (temperature 0 is sent to servers)."""
    do_sample: bool = False
    seed: int = 0
    """Seeds sampling (``torch.manual_seed`` locally, the ``seed`` field for servers)."""
    num_frames: int = 8
    """At most this many evenly spaced frames per clip reach the model."""
    image_max_side: int = 448
    """Frames are downscaled (aspect kept) so that their longer side is at most this."""
    frames_as: str = "video"
    """transformers: feed multi-frame clips as one ``"video"`` (Qwen2-VL style) or as ``"images"``."""
    batch_size: int = 4
    """transformers: clips per ``generate`` call."""
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the bearer token; unset means no Authorization header."""
    timeout_s: float = 120.0
    """Per-request socket timeout (connect, and each read)."""
    retries: int = 3
    """Extra attempts after timeouts, connection errors, 408/425/429/5xx."""
    retry_backoff_s: float = 1.0
    """Sleep before retry k (k = 0, 1, ...) is ``retry_backoff_s * 2**k``."""
    concurrency: int = 4
    """openai: requests in flight at once."""
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"caption.backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.frames_as not in FRAMES_AS:
            raise ValueError(f"caption.frames_as: expected one of {FRAMES_AS}, got {self.frames_as!r}")
        if not self.model:
            raise ValueError("caption.model: expected a model path, hub id or served name, got ''")
        if not self.prompt.strip():
            raise ValueError("caption.prompt: expected a non-empty prompt")
        for name in ("max_new_tokens", "num_frames", "image_max_side", "batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"caption.{name}: expected >= 1, got {getattr(self, name)}")
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ValueError(f"caption.retries/retry_backoff_s: expected >= 0, got {self.retries}/{self.retry_backoff_s}")
        if self.timeout_s <= 0:
            raise ValueError(f"caption.timeout_s: expected > 0, got {self.timeout_s}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"caption.temperature: expected > 0 when do_sample is true, got {self.temperature}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"caption.jpeg_quality: expected 1..100, got {self.jpeg_quality}")


class Captioner(Protocol):
    model_id: str

    def caption(self, clips: list[np.ndarray]) -> list[CaptionResult]: ...


def sample_frames(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """At most ``num_frames`` evenly spaced frames, first and last included: ``(N, H, W, 3)`` → ``(min(N, k), H, W, 3)``."""
    if len(frames) <= num_frames:
        return frames
    idx = np.unique(np.linspace(0, len(frames) - 1, num_frames).round().astype(int))
    return frames[idx]


def fit_max_side(frames: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale ``(N, H, W, 3)`` so that max(H, W) <= max_side, keeping the aspect; never upscales."""
    h, w = frames.shape[1:3]
    if max(h, w) <= max_side:
        return frames
    from PIL import Image

    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames])


def _prepare(clip: np.ndarray, cfg: CaptionConfig, index: int) -> np.ndarray:
    frames = check_frames(clip, what=f"clips[{index}]")
    return fit_max_side(sample_frames(frames, cfg.num_frames), cfg.image_max_side)


# ---------------------------------------------------------------------------------------------
# transformers backend


class TransformersCaptioner:
    """A local ``AutoModelForImageTextToText`` with its ``AutoProcessor`` and chat template."""

    def __init__(self, cfg: CaptionConfig, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        self.device = torch.device(device)
        # bf16 on GPUs; on these CPUs fp32 is faster than bf16 (DESIGN §6).
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(cfg.model)
            self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(
                f"caption.model {cfg.model!r}: could not load an image/video-text-to-text model and processor "
                f"({type(err).__name__}: {err}); offline machines need a local directory or a warm HF cache"
            ) from err
        self.model.to(self.device).eval()
        if getattr(self.processor, "chat_template", None) is None:
            raise ModelLoadError(f"caption.model {cfg.model!r}: its processor has no chat template; expected an instruct/chat VLM")
        if cfg.frames_as == "video" and getattr(self.processor, "video_processor", None) is None:
            raise ModelLoadError(
                f"caption.model {cfg.model!r}: its processor takes no video input; set caption.frames_as = \"images\""
            )
        # Decoder-only generation continues each row from its last token, so pad on the left.
        self.processor.tokenizer.padding_side = "left"
        self.model_id = getattr(self.model.config, MODEL_ID_KEY, None) or cfg.model
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = self.model.generation_config.pad_token_id
        self._stop_ids = set(eos) | ({pad} if pad is not None else set())

    def _messages(self, n_frames: int) -> list[dict[str, Any]]:
        if n_frames > 1 and self.cfg.frames_as == "video":
            visual = [{"type": "video"}]
        else:
            visual = [{"type": "image"}] * n_frames
        return [{"role": "user", "content": [*visual, {"type": "text", "text": self.cfg.prompt}]}]

    def _generate(self, clips: list[np.ndarray]) -> list[CaptionResult]:
        import torch

        as_video = len(clips[0]) > 1 and self.cfg.frames_as == "video"
        texts = [self.processor.apply_chat_template(self._messages(len(c)), add_generation_prompt=True, tokenize=False) for c in clips]
        if as_video:
            inputs = self.processor(text=texts, videos=list(clips), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(text=texts, images=[list(c) for c in clips], return_tensors="pt", padding=True)
        # Pixel tensors take the model's dtype (bf16 on GPU); token ids stay integer.
        inputs = inputs.to(self.device).to(self.model.dtype)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens, "do_sample": self.cfg.do_sample}
        if self.cfg.do_sample:
            gen_kwargs["temperature"] = self.cfg.temperature
            torch.manual_seed(self.cfg.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen_kwargs)  # (B, prompt + new) or (B, new)
        latency = time.perf_counter() - start
        # Decoder-only outputs repeat the prompt; encoder-decoder outputs start with the decoder start token.
        new = out[:, 1:] if self.model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]  # (B, new)
        results = []
        for row in new.tolist():
            n_tokens = next((i for i, t in enumerate(row) if t in self._stop_ids), len(row))
            text = self.processor.decode(row[:n_tokens], skip_special_tokens=True).strip()
            results.append(CaptionResult(caption=text, model=self.model_id, tokens=n_tokens, latency_s=latency))
        return results

    def caption(self, clips: list[np.ndarray]) -> list[CaptionResult]:
        """One caption per clip, in input order."""
        prepared = [_prepare(c, self.cfg, i) for i, c in enumerate(clips)]
        # Single frames go in as images and the rest as videos; keep the two apart so each
        # generate call sees one modality, then put results back in input order.
        groups: dict[bool, list[int]] = {}
        for i, frames in enumerate(prepared):
            groups.setdefault(len(frames) > 1, []).append(i)
        results: list[CaptionResult | None] = [None] * len(prepared)
        for indices in groups.values():
            for start in range(0, len(indices), self.cfg.batch_size):
                chunk = indices[start:start + self.cfg.batch_size]
                for i, result in zip(chunk, self._generate([prepared[i] for i in chunk]), strict=True):
                    results[i] = result
        assert all(r is not None for r in results), "every clip must get a caption"
        return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible backend (vLLM, TGI, llama.cpp server, OpenAI)


def _jpeg_data_url(frame: np.ndarray, quality: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        if "message" in data:
            return str(data["message"])[:500]
    return text[:500]


class OpenAICaptioner:
    """Captions through ``POST {base_url}/chat/completions`` with frames as base64 JPEG ``image_url`` parts."""

    def __init__(self, cfg: CaptionConfig) -> None:
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.model_id = cfg.model
        self._api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None

    def request_body(self, frames: np.ndarray) -> dict[str, Any]:
        """The JSON body for one prepared clip."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": _jpeg_data_url(f, self.cfg.jpeg_quality)}} for f in frames
        ]
        content.append({"type": "text", "text": self.cfg.prompt})
        return {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature if self.cfg.do_sample else 0.0,
            "seed": self.cfg.seed,
        }

    def _post(self, payload: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            return response.read()

    def _caption_one(self, index: int, frames: np.ndarray) -> CaptionResult:
        payload = json.dumps(self.request_body(frames)).encode("utf-8")
        start = time.perf_counter()
        last_problem = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            try:
                body = self._post(payload)
            except urllib.error.HTTPError as err:
                last_problem = f"HTTP {err.code}: {_server_message(err.read())}"
                if err.code not in RETRY_STATUS:
                    raise CaptionError(f"clip {index}: {self.url} refused the request: {last_problem}", index=index) from err
                continue
            except (TimeoutError, socket.timeout) as err:
                last_problem = f"no response within timeout_s={self.cfg.timeout_s} ({err})"
                continue
            except urllib.error.URLError as err:
                if isinstance(err.reason, (TimeoutError, socket.timeout)):
                    last_problem = f"no response within timeout_s={self.cfg.timeout_s} ({err.reason})"
                else:
                    last_problem = f"connection failed: {err.reason}"
                continue
            except (ConnectionError, http.client.HTTPException) as err:  # connection dropped mid-response
                last_problem = f"connection failed: {type(err).__name__}: {err}"
                continue
            return self._parse(index, body, time.perf_counter() - start)
        raise CaptionError(
            f"clip {index}: {self.url} failed after {self.cfg.retries + 1} attempts; last: {last_problem}", index=index
        )

    def _parse(self, index: int, body: bytes, latency: float) -> CaptionResult:
        try:
            data = json.loads(body)
            text = data["choices"][0]["message"]["content"]
            tokens = int(data["usage"]["completion_tokens"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
            raise CaptionError(
                f"clip {index}: expected a chat completion with choices[0].message.content and usage.completion_tokens, "
                f"got {body[:300]!r} ({type(err).__name__}: {err})",
                index=index,
            ) from err
        if not isinstance(text, str):
            raise CaptionError(f"clip {index}: expected message content to be a string, got {type(text).__name__}", index=index)
        return CaptionResult(caption=text.strip(), model=self.model_id, tokens=tokens, latency_s=latency)

    def caption(self, clips: list[np.ndarray]) -> list[CaptionResult]:
        """One caption per clip, in input order; raises :class:`CaptionError` for the first clip that failed."""
        prepared = [_prepare(c, self.cfg, i) for i, c in enumerate(clips)]
        if not prepared:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(prepared))) as pool:
            return list(pool.map(self._caption_one, range(len(prepared)), prepared))


def load_captioner(cfg: CaptionConfig, device: str = "cpu") -> Captioner:
    """Build the configured captioner (loads the local model once; the openai backend holds no model)."""
    if cfg.backend == "openai":
        return OpenAICaptioner(cfg)
    return TransformersCaptioner(cfg, device=device)
