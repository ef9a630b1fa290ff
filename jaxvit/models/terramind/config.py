"""TerraMind v1 configurations: the released sizes and the pre-training modalities.

Modality keys are terratorch's (`untok_sen2l2a@224`, `tok_sen2l2a@224`, `coords`, ...), so parameter paths and
checkpoint keys read the same; `resolve` also takes the short names terratorch accepts (S2L2A, S1GRD, RGB, ...).
Facts from terratorch `models/backbones/terramind/model/{modality_info,terramind_register}.py`.
"""
from __future__ import annotations

import dataclasses

from jaxvit.errors import ConfigError

IMAGE, TOKENS, SEQUENCE = "image", "tokens", "sequence"  # pixel patches | image-token grid | 1-D token sequence


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    key: str
    kind: str  # image | tokens | sequence
    size: int  # image: channels; tokens, sequence: vocabulary size
    max_length: int = 0  # sequence: number of positions


_FSQ_VOCAB = 15360  # the v1 FSQ tokenizers' codebook (levels 8, 8, 8, 6, 5)

# Raw (pixel) inputs of the v1 encoder; channels as built by terratorch (band order: PRETRAINED_BANDS).
RAW_INPUTS = (ModalitySpec("untok_sen2l2a@224", IMAGE, 12), ModalitySpec("untok_sen2l1c@224", IMAGE, 13),
              ModalitySpec("untok_sen2rgb@224", IMAGE, 3), ModalitySpec("untok_sen1grd@224", IMAGE, 2),
              ModalitySpec("untok_sen1rtc@224", IMAGE, 2), ModalitySpec("untok_dem@224", IMAGE, 1))
# Tokenised modalities: encoder inputs and decoder targets.
TOKENISED = (ModalitySpec("tok_sen2l2a@224", TOKENS, _FSQ_VOCAB), ModalitySpec("tok_sen1grd@224", TOKENS, _FSQ_VOCAB),
             ModalitySpec("tok_sen1rtc@224", TOKENS, _FSQ_VOCAB), ModalitySpec("tok_dem@224", TOKENS, _FSQ_VOCAB),
             ModalitySpec("tok_lulc@224", TOKENS, 4375), ModalitySpec("tok_ndvi@224", TOKENS, _FSQ_VOCAB),
             ModalitySpec("coords", SEQUENCE, 30000, max_length=4))
KNOWN = {m.key: m for m in RAW_INPUTS + TOKENISED + (ModalitySpec("caption", SEQUENCE, 30000, max_length=256),)}

# Short names, as terratorch maps them (build_modality_embeddings / build_output_modality_embeddings).
_INPUT_ALIASES = {"S2L2A": "untok_sen2l2a@224", "S2L1C": "untok_sen2l1c@224", "RGB": "untok_sen2rgb@224",
                  "S1GRD": "untok_sen1grd@224", "S1RTC": "untok_sen1rtc@224", "DEM": "untok_dem@224",
                  "LULC": "tok_lulc@224", "NDVI": "tok_ndvi@224", "COORDS": "coords", "CAPTION": "caption"}
_TARGET_ALIASES = {"S2L2A": "tok_sen2l2a@224", "S1GRD": "tok_sen1grd@224", "S1RTC": "tok_sen1rtc@224",
                   "DEM": "tok_dem@224", "LULC": "tok_lulc@224", "NDVI": "tok_ndvi@224", "COORDS": "coords",
                   "CAPTION": "caption"}


@dataclasses.dataclass(frozen=True)
class TerraMindConfig:
    dim: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    gated_mlp: bool = True  # fc2(act(fc1 x) * fc3 x) with hidden int(2 * int(dim * mlp_ratio) / 3)
    act: str = "silu"  # silu | gelu (exact)
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    ln_eps: float = 1e-6  # LayerNorm without bias everywhere
    patch_size: int = 16
    image_size: int = 224  # side of the stored sin-cos position grid (image_size / patch_size)
    encoder_modalities: tuple[ModalitySpec, ...] = RAW_INPUTS + TOKENISED
    decoder_modalities: tuple[ModalitySpec, ...] = TOKENISED
    dtype: str = "float32"  # compute dtype; parameters stay as given (float32, or bfloat16 when frozen)
    remat: str = "none"  # none | full | dots
    attn_impl: str | None = None  # einsum | xla | cudnn; None: einsum on the CPU, else XLA picks
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __post_init__(self):
        problems = [f"{k}={v!r}: {why}" for k, v, bad, why in [
            ("dim", self.dim, self.dim % 4 or self.dim % self.num_heads, "must divide by 4 and by num_heads"),
            ("act", self.act, self.act not in ("gelu", "silu"), "use gelu or silu"),
            ("remat", self.remat, self.remat not in ("none", "full", "dots"), "use none, full or dots"),
            ("decoder_modalities", [m.key for m in self.decoder_modalities if m.kind == IMAGE],
             any(m.kind == IMAGE for m in self.decoder_modalities), "decoder targets are tokens or sequences")]
            if bad]
        if problems:
            raise ConfigError("TerraMindConfig: " + "; ".join(problems))

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.dim * self.mlp_ratio)
        return int(2 * hidden / 3) if self.gated_mlp else hidden

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def spec(self, key: str, side: str) -> ModalitySpec:
        table = self.encoder_modalities if side == "encoder" else self.decoder_modalities
        for m in table:
            if m.key == key:
                return m
        raise ConfigError(f"modality {key!r} has no {side} embedding in this model; it has "
                          f"{[m.key for m in table]}")


_SMALL = dict(qkv_bias=True, proj_bias=True, mlp_bias=True, gated_mlp=False, act="gelu")
PRESETS = {
    "tiny": dict(dim=192, encoder_depth=12, decoder_depth=4, num_heads=3, **_SMALL),
    "small": dict(dim=384, encoder_depth=12, decoder_depth=6, num_heads=6, **_SMALL),
    "base": dict(dim=768, encoder_depth=12, decoder_depth=12, num_heads=12),
    "large": dict(dim=1024, encoder_depth=24, decoder_depth=24, num_heads=16),
}


def terramind_config(name: str = "base", **overrides) -> TerraMindConfig:
    """A released TerraMind v1 size ("tiny", "small", "base", "large"; "terramind_v1_base" works too)."""
    short = name.removeprefix("terramind_v1_")
    if short not in PRESETS:
        raise ConfigError(f"unknown TerraMind size {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TerraMindConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"unknown TerraMindConfig fields {bad}; valid: {sorted(fields)}")
    return TerraMindConfig(**(PRESETS[short] | overrides))


def resolve(name: str, side: str = "encoder") -> str:
    """The terratorch modality key for `name`: a key itself, or a short name (S2L2A, S1GRD, RGB, DEM, ...).
    A short raw-image name means pixels on the encoder side and tokens on the decoder side."""
    if name in KNOWN or "@" in name:
        return name
    aliases = _INPUT_ALIASES if side == "encoder" else _TARGET_ALIASES
    key = aliases.get(name.upper().replace("-", "").replace("_", ""))
    if key is None:
        raise ConfigError(f"unknown modality {name!r}; use a terratorch key ({sorted(KNOWN)}) or one of "
                          f"{sorted(aliases)}")
    return key
