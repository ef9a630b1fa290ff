"""Named presets for the published DINOv2 and DINOv3 backbones, and the transformers hub ids they map to."""
from __future__ import annotations

import ast
import dataclasses

from jaxvit.models.vit import ViTConfig


def _dinov2(d: int, depth: int, heads: int, swiglu: bool = False, reg: bool = False) -> ViTConfig:
    hidden = (int(4 * d * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * d
    return ViTConfig(family="dinov2", patch_size=14, hidden_size=d, depth=depth, num_heads=heads,
                     mlp_hidden=hidden, mlp="swiglu" if swiglu else "mlp", act="silu" if swiglu else "gelu",
                     num_registers=4 if reg else 0,
                     pos_embed="abs", pos_grid=37, pos_antialias=reg, ln_eps=1e-6)


def _dinov3(d: int, depth: int, heads: int, mlp_hidden: int, swiglu: bool = False,
            qkv_bias: bool = True) -> ViTConfig:
    return ViTConfig(family="dinov3", patch_size=16, hidden_size=d, depth=depth, num_heads=heads,
                     mlp_hidden=mlp_hidden, mlp="swiglu" if swiglu else "mlp", act="silu" if swiglu else "gelu",
                     num_registers=4,
                     pos_embed="rope", rope_theta=100.0, rope_rescale=2.0, qkv_bias=qkv_bias,
                     key_bias=False, ln_eps=1e-5)


PRESETS: dict[str, ViTConfig] = {}
for _size, (_d, _l, _h, _g) in {"s": (384, 12, 6, False), "b": (768, 12, 12, False),
                                "l": (1024, 24, 16, False), "g": (1536, 40, 24, True)}.items():
    PRESETS[f"dinov2_vit{_size}14"] = _dinov2(_d, _l, _h, _g)
    PRESETS[f"dinov2_vit{_size}14_reg"] = _dinov2(_d, _l, _h, _g, reg=True)
PRESETS.update({
    "dinov3_vits16": _dinov3(384, 12, 6, 1536),
    "dinov3_vits16plus": _dinov3(384, 12, 6, 1536, swiglu=True),
    "dinov3_vitb16": _dinov3(768, 12, 12, 3072),
    "dinov3_vitl16": _dinov3(1024, 24, 16, 4096),
    "dinov3_vith16plus": _dinov3(1280, 32, 20, 5120, swiglu=True),
    "dinov3_vit7b16": _dinov3(4096, 40, 32, 8192, swiglu=True, qkv_bias=False),
})

HUB_IDS = {
    "facebook/dinov2-small": "dinov2_vits14", "facebook/dinov2-base": "dinov2_vitb14",
    "facebook/dinov2-large": "dinov2_vitl14", "facebook/dinov2-giant": "dinov2_vitg14",
    "facebook/dinov2-with-registers-small": "dinov2_vits14_reg",
    "facebook/dinov2-with-registers-base": "dinov2_vitb14_reg",
    "facebook/dinov2-with-registers-large": "dinov2_vitl14_reg",
    "facebook/dinov2-with-registers-giant": "dinov2_vitg14_reg",
    "facebook/dinov3-vits16-pretrain-lvd1689m": "dinov3_vits16",
    "facebook/dinov3-vits16plus-pretrain-lvd1689m": "dinov3_vits16plus",
    "facebook/dinov3-vitb16-pretrain-lvd1689m": "dinov3_vitb16",
    "facebook/dinov3-vitl16-pretrain-lvd1689m": "dinov3_vitl16",
    "facebook/dinov3-vitl16-pretrain-sat493m": "dinov3_vitl16",
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": "dinov3_vith16plus",
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": "dinov3_vit7b16",
}


def get_config(arch: str | ViTConfig, **overrides) -> ViTConfig:
    """A preset by name (e.g. "dinov2_vitl14_reg") or a ViTConfig, with field overrides.

    Free-form sizes: start from a preset and override, e.g.
    `get_config("dinov2_vits14", hidden_size=64, depth=2, num_heads=2, mlp_hidden=256)`.
    """
    if isinstance(arch, ViTConfig):
        cfg = arch
    elif arch in PRESETS:
        cfg = PRESETS[arch]
    else:
        raise ValueError(f"unknown arch {arch!r}; presets: {', '.join(sorted(PRESETS))}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ViTConfig fields {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def parse_overrides(spec: str) -> dict:
    """"hidden_size=192,depth=6,attn_impl=xla" -> ViTConfig overrides (values read as Python literals when they
    parse, else as strings); the command-line form of `get_config(arch, **overrides)`."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out
