"""DINO-family ViT backbones, Depth Anything on DINOv2, presets and PyTorch weight conversion."""
from jaxvit.models.depth_anything import DepthAnything, DepthAnythingConfig, depth
from jaxvit.models.variants import HUB_IDS, PRESETS, get_config, parse_overrides
from jaxvit.models.vit import ViT, ViTConfig
from jaxvit.models.pretrained import load_pretrained, save_pretrained
from jaxvit.models.weights import WeightLoadError

__all__ = ["DepthAnything", "DepthAnythingConfig", "HUB_IDS", "PRESETS", "ViT", "ViTConfig", "WeightLoadError", "depth",
           "get_config", "load_pretrained", "parse_overrides", "save_pretrained"]
