"""Hugging Face hub ids -> local files: downloaded when online, from the local cache when offline.

huggingface_hub does the work: it reads the token of gated repositories (DINOv3, ...) from HF_TOKEN (or
`huggingface-cli login`), keeps files in HF_HOME's cache (~/.cache/huggingface), and with HF_HUB_OFFLINE=1
answers from that cache alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from jaxvit.errors import WeightLoadError

_WEIGHTS = ["*.json", "*.safetensors", "*.pt", "*.pth", "*.txt"]  # pytorch_model.bin only when nothing else


def is_hub_id(source: str | os.PathLike) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", str(source))) and not Path(source).expanduser().exists()


def _explain(repo: str, what: str, e: Exception) -> WeightLoadError:
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return WeightLoadError(
        f"{what}: not downloaded and not in the local Hugging Face cache {cache} ({type(e).__name__}). "
        f"Either go online "
        f"(HF_HUB_OFFLINE unset; for a gated repository accept its licence on huggingface.co and set HF_TOKEN), or "
        f"fill the cache where there is internet (`huggingface-cli download {repo}`), copy it to HF_HOME and set "
        f"HF_HUB_OFFLINE=1; or pass a local path.")


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def snapshot(repo: str) -> Path:
    """The directory of a hub repository's weights and configs (a transformers checkpoint, a .pt file, ...)."""
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(repo, allow_patterns=_WEIGHTS, local_files_only=_offline()))
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.pt*")):
            path = Path(snapshot_download(repo, allow_patterns=_WEIGHTS + ["*.bin"], local_files_only=_offline()))
        return path
    except Exception as e:  # offline and not cached, gated without a token, no such repository, no network
        raise _explain(repo, repo, e) from e


def file(repo: str, filename: str) -> Path:
    """One file of a hub repository."""
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo, filename, local_files_only=_offline()))
    except Exception as e:
        raise _explain(repo, f"{repo}/{filename}", e) from e
