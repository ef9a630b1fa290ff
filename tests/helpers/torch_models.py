"""Tiny transformers models with random weights: the PyTorch side of the parity tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, Dinov2Model

TINY_DINOV2 = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=56, patch_size=14)
TINY_NECK = dict(reassemble_hidden_size=64, neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32,
                 head_hidden_size=16)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def perturbed(model_cls, config):
    """A transformers model whose every tensor is random (no zero or one left to hide a bug)."""
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0) * torch.rand(()))
    return model


def tiny_hf_dinov2(directory: Path) -> Path:
    """A randomly initialised (and perturbed) transformers DINOv2 checkpoint of the tiny size, saved to disk."""
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                  image_size=32, patch_size=8)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(directory)
    return directory


def depth_anything(kind: str = "relative", out_indices=(1, 2, 3, 4), **neck) -> DepthAnythingForDepthEstimation:
    """A tiny transformers Depth Anything with every tensor random. Metric models get their last conv scaled
    so that the sigmoid's input is O(1): a saturated sigmoid would turn 1e-7 relative logit errors into 0-or-1
    flips and test nothing."""
    torch.manual_seed(0)
    backbone = Dinov2Config(**TINY_DINOV2, out_indices=list(out_indices), reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, **(TINY_NECK | neck), depth_estimation_type=kind,
                                 max_depth=20 if kind == "metric" else 1)
    model = perturbed(DepthAnythingForDepthEstimation, config)
    if kind == "metric":
        logits = []
        hook = model.head.conv3.register_forward_hook(lambda m, i, o: logits.append(o))
        with torch.no_grad():
            model(pixel_values=torch.randn(1, 3, 56, 84))
            hook.remove()
            model.head.conv3.weight /= logits[0].std() / 2
            model.head.conv3.bias.zero_()
    return model
