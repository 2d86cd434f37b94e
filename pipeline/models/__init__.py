"""Neural scorers and captioners for the curation pipeline, as plain model-level code.

Each module loads its weights once (``load_*``) and then maps a batch of clips; the Ray stage
adapters hold one loaded object per actor. Frames arrive as RGB ``uint8`` arrays ``(N, H, W, 3)``.

Weight sources are either a local file or ``hf://owner/repo/path/in/repo`` (resolved through the
Hugging Face cache, so an offline machine with a warm cache still works). Stand-in models built by
:mod:`pipeline.models.standins` go through exactly the same loading code; their ids start with
``standin:`` so every output row names them as stand-ins.

This module holds the helpers the model modules share; import the models from their modules
(``pipeline.models.watermark`` ...) so that importing the package stays cheap.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

HF_PREFIX = "hf://"
STANDIN_PREFIX = "standin:"
# Key under which a safetensors file (or a saved HF config) names the model it holds.
MODEL_ID_KEY = "curation_model_id"


class ModelLoadError(RuntimeError):
    """Weights could not be found or do not fit the expected architecture."""


def check_frames(frames: np.ndarray, *, what: str = "frames") -> np.ndarray:
    """Validate a clip's frames: RGB ``uint8`` ``(N, H, W, 3)`` with ``N >= 1``; a single ``(H, W, 3)`` image is promoted."""
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array (N, H, W, 3) uint8, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or min(frames.shape[1:3]) < 1:
        raise ValueError(f"{what}: expected shape (N>=1, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {frames.dtype}")
    return frames


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "true", "yes", "on"}


def resolve_weights_file(source: str, *, what: str) -> Path:
    """Turn a weight source into a local file path.

    Args:
        source: a local file, or ``hf://owner/repo/path/in/repo`` (downloaded into the HF cache).
        what: what the weights are for, used in error messages.

    Raises:
        ModelLoadError: the file does not exist, or the hub file is neither cached nor downloadable.
    """
    if source.startswith(HF_PREFIX):
        parts = source[len(HF_PREFIX):].split("/", 2)
        if len(parts) != 3 or not all(parts):
            raise ModelLoadError(f"{what}: expected hf://owner/repo/filename, got {source!r}")
        repo_id, filename = f"{parts[0]}/{parts[1]}", parts[2]
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            # The cache first: a warm cache must work without any network round trip.
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        except LocalEntryNotFoundError as cached_err:
            if _hub_offline():
                raise ModelLoadError(
                    f"{what}: {source} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                    f"download it on a connected machine or pass a local file path"
                ) from cached_err
        try:
            return Path(hf_hub_download(repo_id, filename))
        except (OSError, HfHubHTTPError) as err:
            raise ModelLoadError(
                f"{what}: could not fetch {source} from the Hugging Face hub ({type(err).__name__}: {err}); "
                f"pass a local file path instead"
            ) from err
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{what}: expected a local weights file or hf://owner/repo/filename, got {source!r} (no such file)")
    return path


def load_state_dict_file(path: Path, *, what: str) -> tuple[dict, str | None]:
    """Read a state dict from ``.safetensors`` / ``.pt`` / ``.pth``; also return the model id stored in safetensors metadata."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return state, meta.get(MODEL_ID_KEY)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ModelLoadError(f"{what}: could not read {path} as a torch state dict: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{what}: expected a state dict in {path}, got {type(state).__name__}")
    # Checkpoints saved from DataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, None


def save_state_dict_file(state: dict, path: Path, *, model_id: str) -> None:
    """Save a state dict as safetensors with the model id in its metadata."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={MODEL_ID_KEY: model_id})


def join_model_ids(*ids: str) -> str:
    """Join component ids into one; a stand-in anywhere makes the whole model a stand-in."""
    if any(i.startswith(STANDIN_PREFIX) for i in ids):
        return STANDIN_PREFIX + "+".join(i.removeprefix(STANDIN_PREFIX) for i in ids)
    return "+".join(ids)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
