"""Configuration of TerraMind's image tokenizers (DiVAE: ViT encoder, FSQ bottleneck, diffusion UNet decoder).

Values follow terratorch's `tokenizer_register.py` (TerraMind v1 S2L2A, S1GRD, S1RTC, DEM, NDVI): ViT-B/16
encoder with a post-MLP, FSQ levels 8-8-8-6-5 (15360 codes), a patched UNet decoder (patch 4, 256 channels,
mults 1-2-2-2, 3 res blocks, attention at 4x and 8x) and a DDIM scheduler over 1000 linear-beta training steps
with zero terminal SNR, x0 ("sample") prediction and thresholding of the predicted x0.
"""
from __future__ import annotations

import dataclasses
import math

from jaxvit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    channels: int = 12  # image bands in and out
    image_size: int = 256  # training size: the encoder's position grid is image_size / patch_size
    patch_size: int = 16  # encoder patch = one token
    # ViT encoder
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    enc_mlp_ratio: float = 4.0
    post_mlp: bool = True  # x + MLP_tanh(LN(x)) after the blocks
    # FSQ bottleneck: one code dimension per level; token id = sum_i digit_i * prod(levels[:i])
    levels: tuple[int, ...] = (8, 8, 8, 6, 5)
    # Diffusion decoder: UNet on (dec_patch x dec_patch)-patchified images, codes upsampled and concatenated
    dec_patch_size: int = 4
    dec_channels: int = 256
    dec_channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    dec_res_blocks: int = 3
    dec_attention_resolutions: tuple[int, ...] = (4, 8)  # downsampling factors with self-attention
    dec_num_heads: int = 1
    dec_groups: int = 32  # GroupNorm groups
    # Noise schedule and DDIM step
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = True
    prediction_type: str = "sample"  # sample (x0) | epsilon | v_prediction
    thresholding: bool = True  # dynamic thresholding of the predicted x0 (takes precedence over clip_sample)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0  # with 1.0, thresholding is a clip to [-1, 1]
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    dtype: str = "float32"  # compute dtype of the networks; scheduler arithmetic stays float32

    @property
    def latent_dim(self) -> int:
        return len(self.levels)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.levels)

    def validate(self) -> "TokenizerConfig":
        if self.prediction_type not in ("sample", "epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type={self.prediction_type!r}: use sample, epsilon or v_prediction")
        if self.enc_dim % 4 or self.enc_dim % self.enc_heads:
            raise ConfigError(f"enc_dim={self.enc_dim} must be divisible by 4 (sin-cos grid) and enc_heads")
        widths = {self.dec_channels * m for m in self.dec_channel_mult}
        if any(w % self.dec_groups for w in widths):
            raise ConfigError(f"decoder widths {sorted(widths)} must be multiples of dec_groups={self.dec_groups}")
        if min(self.levels) < 2:
            raise ConfigError(f"levels={self.levels}: every FSQ level must be >= 2")
        return self


_RELEASED = dict(patch_size=16, image_size=256)

# terratorch's registered names -> band count; the architecture is shared (see module docstring).
VARIANTS: dict[str, TokenizerConfig] = {
    "terramind_v1_tokenizer_s2l2a": TokenizerConfig(channels=12, **_RELEASED),
    "terramind_v1_tokenizer_s1grd": TokenizerConfig(channels=2, **_RELEASED),
    "terramind_v1_tokenizer_s1rtc": TokenizerConfig(channels=2, **_RELEASED),
    "terramind_v1_tokenizer_dem": TokenizerConfig(channels=1, **_RELEASED),
    "terramind_v1_tokenizer_ndvi": TokenizerConfig(channels=1, **_RELEASED),
}


def tokenizer_config(name: str | TokenizerConfig, **overrides) -> TokenizerConfig:
    """A released tokenizer's config by terratorch name (or modality: s2l2a, s1grd, ...), with overrides."""
    if isinstance(name, TokenizerConfig):
        base = name
    else:
        key = name if name in VARIANTS else f"terramind_v1_tokenizer_{name.lower()}"
        if key not in VARIANTS:
            raise ConfigError(f"unknown TerraMind tokenizer {name!r}; known: {', '.join(VARIANTS)}")
        base = VARIANTS[key]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TokenizerConfig)}
    if unknown:
        raise ConfigError(f"unknown tokenizer config fields {sorted(unknown)}")
    return dataclasses.replace(base, **overrides).validate()
