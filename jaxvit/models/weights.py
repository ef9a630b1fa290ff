"""Load PyTorch DINOv2/DINOv3 weights into jaxvit and write them back (transformers or original layout)."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxvit.errors import WeightLoadError
from jaxvit.models import hub, keymap
from jaxvit.models.variants import get_config
from jaxvit.models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

# Keys of original checkpoints that the backbone does not use: derived buffers and training-only modules.
_IGNORED_OFFICIAL = re.compile(r"(^rope_embed\.periods$|\.bias_mask$|^local_cls_norm\.)")


# ----------------------------------------------------------------------------------------------- reading

def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float32) if t.dtype != np.float32 and t.dtype.kind == "f" else t
    return t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
    except (TypeError, ValueError):  # e.g. bfloat16 tensors, which numpy cannot hold: go through torch
        with safe_open(str(path), framework="pt") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def _read_torch(path: Path) -> dict:
    try:
        import torch
    except ImportError as e:
        raise WeightLoadError(f"{path}: reading a PyTorch pickle needs torch (pip install 'jaxvit[torch]'), "
                              "or convert the file to safetensors") from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    while isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("model", "state_dict", "module"):
        obj = next(iter(obj.values()))
    return obj


def _flatten_state(obj, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten_state(v, f"{prefix}{k}."))
        elif hasattr(v, "shape"):
            out[prefix + k] = _to_numpy(v)
    return out


def _resolve(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    if hub.is_hub_id(source):
        return hub.snapshot(str(source))
    raise WeightLoadError(f"{source}: no such file or directory (nor a hub id like facebook/dinov2-large)")


def read_checkpoint(source: str | os.PathLike) -> tuple[dict[str, np.ndarray], str, dict | None, Path]:
    """(state dict, "hf" | "official", transformers config or None, resolved path)."""
    path = _resolve(source)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise WeightLoadError(f"{path}: a transformers checkpoint directory needs config.json")
        hf_cfg = json.loads(cfg_file.read_text())
        index = path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd = {k: v for s in shards for k, v in _read_safetensors(path / s).items()}
        elif (path / "model.safetensors").exists():
            sd = _read_safetensors(path / "model.safetensors")
        elif (path / "pytorch_model.bin").exists():
            sd = _flatten_state(_read_torch(path / "pytorch_model.bin"))
        else:
            raise WeightLoadError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
        return _strip_hf_prefixes(sd), "hf", hf_cfg, path
    sd = _read_safetensors(path) if path.suffix == ".safetensors" else _flatten_state(_read_torch(path))
    return sd, "official", None, path


def _strip_hf_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(dinov2|dinov2_with_registers|dinov3_vit)\.", "", k)  # task-model base prefix
        k = re.sub(r"^model\.layer\.", "layer.", k)  # transformers 5 in-memory DINOv3 name
        out[k] = v
    return out


def official_backbone(sd: dict, which: str) -> dict:
    """Select the backbone of an original checkpoint: teacher/student wrappers, `backbone.`, block chunks."""
    sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items()}
    if any(k.startswith(("teacher.", "student.")) for k in sd):
        sd = {k[len(which) + 1:]: v for k, v in sd.items() if k.startswith(which + ".")}
    if any(k.startswith("backbone.") for k in sd):
        dropped = sorted({k.split(".")[0] for k in sd if not k.startswith("backbone.")})
        if dropped:
            log.info("ignoring non-backbone modules of the training checkpoint: %s", dropped)
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------- configs

def config_from_hf(hf: dict) -> ViTConfig:
    mt = hf.get("model_type")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "silu"):
        raise WeightLoadError(f"hidden_act={act!r} is not supported (gelu or silu)")
    d = hf["hidden_size"]
    common = dict(patch_size=hf["patch_size"], hidden_size=d, depth=hf["num_hidden_layers"],
                  num_heads=hf["num_attention_heads"], ln_eps=hf["layer_norm_eps"],
                  layerscale=hf.get("layerscale_value", 1.0), num_channels=hf.get("num_channels", 3))
    if mt in ("dinov2", "dinov2_with_registers"):
        swiglu = hf.get("use_swiglu_ffn", False)
        hidden = int(d * hf.get("mlp_ratio", 4))
        if swiglu:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        size = hf["image_size"] if isinstance(hf["image_size"], int) else hf["image_size"][0]
        # transformers' DINOv2 SwiGLU always gates with SiLU; hidden_act applies to the plain MLP only.
        return ViTConfig(family="dinov2", mlp_hidden=hidden, mlp="swiglu" if swiglu else "mlp",
                         act="silu" if swiglu else act,
                         num_registers=hf.get("num_register_tokens", 0) if mt == "dinov2_with_registers" else 0,
                         pos_embed="abs", pos_grid=size // hf["patch_size"],
                         pos_antialias=mt == "dinov2_with_registers", qkv_bias=hf.get("qkv_bias", True),
                         key_bias=hf.get("qkv_bias", True), **common)
    if mt == "dinov3_vit":
        if hf.get("query_bias", True) != hf.get("value_bias", True):
            raise WeightLoadError("query_bias != value_bias is not supported")
        return ViTConfig(family="dinov3", mlp_hidden=hf["intermediate_size"],
                         mlp="swiglu" if hf.get("use_gated_mlp") else "mlp", act=act,
                         num_registers=hf.get("num_register_tokens", 0), pos_embed="rope",
                         rope_theta=hf.get("rope_theta", 100.0), rope_rescale=hf.get("pos_embed_rescale"),
                         qkv_bias=hf.get("query_bias", True), key_bias=hf.get("key_bias", False),
                         proj_bias=hf.get("proj_bias", True), mlp_bias=hf.get("mlp_bias", True), **common)
    raise WeightLoadError(f"model_type {mt!r} is not a DINOv2/DINOv3 backbone "
                          "(expected dinov2, dinov2_with_registers or dinov3_vit)")


def config_to_hf(cfg: ViTConfig) -> dict:
    """transformers config.json for `cfg`; raises where transformers cannot express the model."""
    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  patch_size=cfg.patch_size, layer_norm_eps=cfg.ln_eps, num_channels=cfg.num_channels,
                  hidden_act=cfg.act, layerscale_value=1.0 if cfg.layerscale is None else cfg.layerscale,
                  drop_path_rate=0.0)
    if cfg.layerscale is None:
        raise WeightLoadError("transformers DINO models always have LayerScale; this config has none")
    if cfg.family == "dinov2":
        ratio = cfg.mlp_hidden // cfg.hidden_size if cfg.mlp == "mlp" else 4
        expected = ratio * cfg.hidden_size if cfg.mlp == "mlp" else (int(4 * cfg.hidden_size * 2 / 3) + 7) // 8 * 8
        if cfg.mlp_hidden != expected or cfg.qkv_bias != cfg.key_bias or not (cfg.proj_bias and cfg.mlp_bias):
            raise WeightLoadError("this DINOv2 config (MLP width or biases) has no transformers equivalent")
        if cfg.act != ("silu" if cfg.mlp == "swiglu" else "gelu"):
            raise WeightLoadError(f"transformers' DINOv2 cannot use act={cfg.act!r} with mlp={cfg.mlp!r}")
        if cfg.pos_antialias != bool(cfg.num_registers):
            raise WeightLoadError("transformers interpolates positions with antialias exactly for register models")
        mt = "dinov2_with_registers" if cfg.num_registers else "dinov2"
        out = dict(model_type=mt, architectures=["Dinov2WithRegistersModel" if cfg.num_registers else "Dinov2Model"],
                   mlp_ratio=ratio, use_swiglu_ffn=cfg.mlp == "swiglu", qkv_bias=cfg.qkv_bias,
                   image_size=cfg.pos_grid * cfg.patch_size, **common)
        if cfg.num_registers:
            out["num_register_tokens"] = cfg.num_registers
        return out
    return dict(model_type="dinov3_vit", architectures=["DINOv3ViTModel"], intermediate_size=cfg.mlp_hidden,
                use_gated_mlp=cfg.mlp == "swiglu", num_register_tokens=cfg.num_registers, rope_theta=cfg.rope_theta,
                query_bias=cfg.qkv_bias, key_bias=cfg.key_bias, value_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                mlp_bias=cfg.mlp_bias, pos_embed_rescale=cfg.rope_rescale, image_size=224, **common)


_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 20, 1536: 24, 4096: 32}


def infer_official_config(sd: dict[str, np.ndarray]) -> ViTConfig:
    """Architecture of an original-repository backbone from its tensor shapes."""
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise WeightLoadError("not a DINOv2/DINOv3 backbone: no cls_token / patch_embed.proj.weight "
                              f"(first keys: {sorted(sd)[:8]})")
    d, c, p, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    v3 = "storage_tokens" in sd or "pos_embed" not in sd
    swiglu = "blocks.0.mlp.w12.weight" in sd or "blocks.0.mlp.w1.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1] if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    regs = sd.get("storage_tokens", sd.get("register_tokens"))
    heads = _HEADS_BY_WIDTH.get(d, max(d // 64, 1))
    fields = dict(patch_size=p, hidden_size=d, depth=depth, num_heads=heads, mlp_hidden=hidden,
                  mlp="swiglu" if swiglu else "mlp", act="silu" if swiglu else "gelu", num_registers=0 if regs is None else regs.shape[1],
                  num_channels=c, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                  proj_bias="blocks.0.attn.proj.bias" in sd,
                  layerscale=1.0 if "blocks.0.ls1.gamma" in sd else None)
    if v3:
        return get_config("dinov3_vits16", key_bias=False, **fields)
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    return get_config("dinov2_vits14", key_bias=fields["qkv_bias"], pos_grid=grid,
                      pos_antialias=regs is not None, **fields)


# ---------------------------------------------------------------------------------------- import/export

def param_shapes(cfg: ViTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    size = cfg.patch_size * 2
    shapes = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, cfg.num_channels))))
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}


def import_params(cfg: ViTConfig, sd: dict[str, np.ndarray], fmt: str, *, strict: bool = True,
                  where: str = "checkpoint") -> dict:
    """Nested float32 params from a torch state dict; every missing, extra or mis-shaped key is reported."""
    def init() -> dict:
        return ViT(cfg).init(jax.random.key(0), jnp.zeros((1, cfg.patch_size, cfg.patch_size, cfg.num_channels)))

    ignored = (lambda k: bool(_IGNORED_OFFICIAL.search(k))) if fmt == "official" else None
    return import_entries(keymap.entries(cfg, fmt), sd, param_shapes(cfg), init, strict=strict, where=where,
                          ignored=ignored)


def import_entries(entries: list[keymap.Entry], sd: dict[str, np.ndarray],
                   expected: dict[tuple[str, ...], tuple[int, ...]], init: Callable[[], dict], *,
                   strict: bool = True, where: str = "checkpoint",
                   ignored: Callable[[str], bool] | None = None, buffers: dict[str, np.ndarray] | None = None,
                   hint: str = "check the arch") -> dict:
    """Nested params from `sd` through `entries`, checked against the `expected` leaf shapes; missing,
    unexpected (not `ignored`) and mis-shaped keys, tied keys (two entries, one leaf) that differ, and fixed
    `buffers` (derived tensors the model recomputes) that differ from the model's are reported together.
    strict=False takes missing leaves from `init()` (variables with a "params" collection)."""
    flat, sources, missing, bad = {}, {}, [], []
    for e in entries:
        if e.key not in sd:
            missing.append(e.key)
            continue
        for path, value in zip(e.paths, e.to_flax(np.asarray(sd[e.key], np.float32))):
            if value.shape != expected[path]:
                bad.append(f"{e.key} {tuple(sd[e.key].shape)} -> {'/'.join(path)} {value.shape}, "
                           f"model expects {expected[path]}")
            elif path in flat and not np.array_equal(flat[path], value):
                bad.append(f"{e.key} differs from {sources[path]}, which the model ties it to")
            flat[path], sources[path] = value, e.key
    for key, ref in (buffers or {}).items():
        if key not in sd:
            missing.append(key)
        elif tuple(sd[key].shape) != ref.shape or not np.allclose(sd[key], ref, atol=1e-4):
            bad.append(f"{key} {tuple(sd[key].shape)} is not the model's fixed buffer {ref.shape}")
    used = {e.key for e in entries} | set(buffers or ())
    unexpected = sorted(k for k in sd if k not in used and not (ignored and ignored(k)))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if bad:
        problems.append("mismatches:\n  " + "\n  ".join(bad))
    if bad or (problems and strict):
        raise WeightLoadError(f"{where} does not match the model: " + "\n".join(problems)
                              + f"\n({hint}, or pass strict=False to initialise missing keys and "
                                "ignore unexpected ones)")
    if problems:
        log.warning("%s: %s", where, "; ".join(problems))
    if any(p not in flat for p in expected):  # strict=False: fill from a fresh init
        for path, v in traverse_util.flatten_dict(init()["params"]).items():
            flat.setdefault(path, np.asarray(v))
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def export_state_dict(cfg: ViTConfig, params: dict, fmt: str) -> dict[str, np.ndarray]:
    return export_entries(keymap.entries(cfg, fmt), params)


def export_entries(entries: list[keymap.Entry], params: dict) -> dict[str, np.ndarray]:
    """The torch state dict (float32 numpy) of nested `params` through `entries`."""
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    return {e.key: np.ascontiguousarray(e.to_torch([flat[p] for p in e.paths])) for e in entries}


def write_state_dict(sd: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """A state dict as .safetensors, or as a torch pickle (.pt / .pth, needs torch)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file(sd, str(out), metadata={"format": "pt"})
        return out
    try:
        import torch
    except ImportError as e:
        raise WeightLoadError(f"{out}: writing a torch pickle needs torch; use a .safetensors path") from e
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, out)
    return out
