"""The tokenizer's diffusion decoder: terratorch's `PatchedUNetCondCat` (`unet_patched`), NHWC.

The noisy image is cut into dec_patch x dec_patch patches (channels ordered (c, ph, pw)), the FSQ codes are
nearest-upsampled to that grid and concatenated, and a guided-diffusion UNet (GroupNorm(32) + SiLU residual
blocks with an additive timestep embedding, single-head QKV attention in the legacy head order, strided-conv
down / nearest+conv up, skip concatenation) predicts the output, which is unpatchified.

`unet_plan` lists the layers once; the module and the checkpoint key map both walk it. Each entry is
(torch prefix below `decoder.`, kind, in channels, out channels) with kind conv | res | attn | down | up.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvit.models.layers import Linear
from jaxvit.models.terramind.tokenizer.config import TokenizerConfig

Array = jax.Array
Layer = tuple[str, str, int, int]


def unet_plan(cfg: TokenizerConfig) -> tuple[list[list[Layer]], list[Layer], list[list[Layer]]]:
    """(input blocks, middle block, output blocks) in upstream order and naming."""
    mc, mults, attn_at = cfg.dec_channels, cfg.dec_channel_mult, cfg.dec_attention_resolutions
    p2 = cfg.dec_patch_size ** 2
    ch = mc * mults[0]
    inputs: list[list[Layer]] = [[("input_blocks.0.0", "conv", cfg.channels * p2 + cfg.latent_dim, ch)]]
    skips, ds = [ch], 1
    for level, mult in enumerate(mults):
        for _ in range(cfg.dec_res_blocks):
            i = len(inputs)
            layers = [(f"input_blocks.{i}.0", "res", ch, mc * mult)]
            ch = mc * mult
            if ds in attn_at:
                layers.append((f"input_blocks.{i}.1", "attn", ch, ch))
            inputs.append(layers)
            skips.append(ch)
        if level != len(mults) - 1:
            inputs.append([(f"input_blocks.{len(inputs)}.0", "down", ch, ch)])
            skips.append(ch)
            ds *= 2
    middle = [("middle_block.0", "res", ch, ch), ("middle_block.1", "attn", ch, ch), ("middle_block.2", "res", ch, ch)]
    outputs: list[list[Layer]] = []
    for level, mult in reversed(list(enumerate(mults))):
        for j in range(cfg.dec_res_blocks + 1):
            i = len(outputs)
            layers = [(f"output_blocks.{i}.0", "res", ch + skips.pop(), mc * mult)]
            ch = mc * mult
            if ds in attn_at:
                layers.append((f"output_blocks.{i}.{len(layers)}", "attn", ch, ch))
            if level and j == cfg.dec_res_blocks:
                layers.append((f"output_blocks.{i}.{len(layers)}", "up", ch, ch))
                ds //= 2
            outputs.append(layers)
    return inputs, middle, outputs


def flax_name(prefix: str) -> str:
    return prefix.replace(".", "_")


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps t [N] -> [N, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32).reshape(-1, 1) * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def nearest_resize(x: Array, size: tuple[int, int]) -> Array:
    """torch F.interpolate(mode="nearest") of NHWC x: source index floor(i * in / out)."""
    idx = [np.minimum(np.floor(np.arange(o) * np.float32(n / o)).astype(np.int64), n - 1)
           for n, o in zip(x.shape[1:3], size)]
    return x[:, idx[0]][:, :, idx[1]]


def _group_norm(x: Array, groups: int, name: str) -> Array:
    """GroupNorm computed in float32 (upstream `GroupNorm32`), eps 1e-5; call inside a compact method."""
    norm = nn.GroupNorm(groups, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def _conv(features: int, dtype, name: str, kernel: int = 3, stride: int = 1) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   name=name)


class ResBlock(nn.Module):
    out_channels: int
    groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        h = _conv(self.out_channels, self.dtype, "in_conv")(nn.silu(_group_norm(x, self.groups, "in_norm")))
        h = h + Linear(self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))[:, None, None, :]
        h = _conv(self.out_channels, self.dtype, "out_conv")(nn.silu(_group_norm(h, self.groups, "out_norm")))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, self.dtype, "skip", kernel=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions; qkv channels are (head, q|k|v, head_dim) as `QKVAttentionLegacy`."""
    num_heads: int
    groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        seq = x.reshape(b, hh * ww, c)
        qkv = Linear(3 * c, dtype=self.dtype, name="qkv")(_group_norm(seq, self.groups, "norm"))
        ch = c // self.num_heads
        q, k, v = jnp.split(qkv.reshape(b, hh * ww, self.num_heads, 3 * ch), 3, axis=-1)
        logits = jnp.einsum("bthc,bshc->bhts", q, k, preferred_element_type=jnp.float32) / math.sqrt(ch)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhts,bshc->bthc", weights, v).reshape(b, hh * ww, c)
        out = Linear(c, dtype=self.dtype, name="proj_out")(out)
        return (seq + out).reshape(b, hh, ww, c)


class PatchedUNet(nn.Module):
    """decoder(noisy [B, H, W, C], t (scalar or [B]), codes [B, h, w, latent_dim]) -> [B, H, W, C]."""
    cfg: TokenizerConfig

    @nn.compact
    def __call__(self, sample: Array, t: Array, codes: Array) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        b, hh, ww, c = sample.shape
        p = cfg.dec_patch_size
        step = p * 2 ** (len(cfg.dec_channel_mult) - 1)  # the UNet halves the patch grid once per extra level
        if hh % step or ww % step or c != cfg.channels:
            raise ValueError(f"decoder sample {tuple(sample.shape)} must be [B, H, W, {cfg.channels}] with H and W "
                             f"multiples of {step}")
        nh, nw = hh // p, ww // p
        x = sample.reshape(b, nh, p, nw, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, nh, nw, c * p * p)
        x = jnp.concatenate([x, nearest_resize(codes.astype(x.dtype), (nh, nw))], axis=-1).astype(dtype)

        width = 4 * cfg.dec_channels
        emb = timestep_embedding(t, cfg.dec_channels)
        emb = Linear(width, dtype=dtype, name="time_embed_0")(emb)
        emb = Linear(width, dtype=dtype, name="time_embed_2")(nn.silu(emb))

        def run(layers: list[Layer], h: Array) -> Array:
            for prefix, kind, _, out in layers:
                name = flax_name(prefix)
                if kind == "conv":
                    h = _conv(out, dtype, name)(h)
                elif kind == "res":
                    h = ResBlock(out, cfg.dec_groups, dtype, name=name)(h, emb)
                elif kind == "attn":
                    h = AttentionBlock(cfg.dec_num_heads, cfg.dec_groups, dtype, name=name)(h)
                elif kind == "down":
                    h = _conv(out, dtype, name, stride=2)(h)
                else:  # up: nearest x2, then conv
                    h = _conv(out, dtype, name)(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
            return h

        inputs, middle, outputs = unet_plan(cfg)
        skips = []
        h = x
        for layers in inputs:
            h = run(layers, h)
            skips.append(h)
        h = run(middle, h)
        for layers in outputs:
            h = run(layers, jnp.concatenate([h, skips.pop()], axis=-1))
        h = nn.silu(_group_norm(h, cfg.dec_groups, "out_0"))
        h = _conv(c * p * p, dtype, "out_2")(h)
        out = h.astype(jnp.float32).reshape(b, nh, nw, c, p, p).transpose(0, 1, 4, 2, 5, 3)
        return out.reshape(b, hh, ww, c)
