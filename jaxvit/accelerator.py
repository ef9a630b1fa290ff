"""What a run computes on: the devices jax found, and a GPU that jax does not use (a CPU-only jax install)."""
from __future__ import annotations

import collections
import logging
import shutil
from pathlib import Path
from typing import Callable

import jax

from jaxvit.errors import ConfigError

log = logging.getLogger("jaxvit")


def describe_devices(devices=None) -> str:
    """'1 x NVIDIA H200 (gpu)', '2 x cpu', 'TPU v5 lite (tpu)' ...: count, kind and platform of each group."""
    groups = collections.Counter((d.device_kind, d.platform) for d in (devices or jax.devices()))
    return ", ".join(f"{n} x {kind}" if kind.lower() == platform else f"{n} x {kind} ({platform})"
                     for (kind, platform), n in groups.items())


def visible_gpu(dev_dir: str | Path = "/dev", which: Callable[[str], str | None] = shutil.which) -> str | None:
    """What shows an NVIDIA GPU on this machine (`/dev/nvidia0`, `nvidia-smi on PATH`), or None."""
    nodes = sorted(Path(dev_dir).glob("nvidia[0-9]*"))
    if nodes:
        return str(nodes[0])
    if which("nvidia-smi"):
        return "nvidia-smi on PATH"
    return None


def check(require: bool, platform: str | None = None, dev_dir: str | Path = "/dev",
          which: Callable[[str], str | None] = shutil.which) -> None:
    """Warn (or, with train.require_accelerator, stop) when jax computes on the CPU although a GPU is visible."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return
    gpu = visible_gpu(dev_dir, which)
    if require:
        seen = f" ({gpu} shows a GPU)" if gpu else ""
        raise ConfigError(f"train.require_accelerator=True but jax runs on the CPU{seen}: install jax with its GPU "
                          'plugin, `pip install "jaxvit[cuda12]"` (or "jaxvit[tpu]" on a TPU VM)')
    if gpu:
        log.warning('jax runs on the CPU although %s shows an NVIDIA GPU: install `pip install "jaxvit[cuda12]"` '
                    "(jax's CUDA 12 plugin); set train.require_accelerator=True to make this an error", gpu)
