"""Import terratorch's model files without its package __init__s, which pull geospatial dependencies and
torchvision: terratorch is installed with --no-deps and each parent package is stubbed by a bare module that
only carries its directory."""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path


def terratorch_root() -> Path:
    loaded = sys.modules.get("terratorch")
    if loaded is not None:
        return Path(next(iter(loaded.__path__)))
    return Path(importlib.util.find_spec("terratorch").submodule_search_locations[0])


def stub_packages(package: str) -> None:
    """Stub `package` ("terratorch.models....") and every package above it, where not imported yet."""
    root, parts = terratorch_root(), package.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(root.joinpath(*parts[1:i]))]
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__spec__.submodule_search_locations = module.__path__
            sys.modules[name] = module


def import_terratorch(package: str, *modules: str) -> tuple[types.ModuleType, ...]:
    stub_packages(package)
    return tuple(importlib.import_module(f"{package}.{m}") for m in modules)
