"""DINO-family ViT backbones, presets and PyTorch weight conversion."""
from jaxvit.models.variants import HUB_IDS, PRESETS, get_config, parse_overrides
from jaxvit.models.vit import ViT, ViTConfig
from jaxvit.models.weights import WeightLoadError, load_pretrained, save_pretrained

__all__ = ["HUB_IDS", "PRESETS", "ViT", "ViTConfig", "WeightLoadError", "get_config", "load_pretrained", "parse_overrides",
           "save_pretrained"]
