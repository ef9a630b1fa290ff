"""TerraMind v1 (IBM / ESA) in Flax: configs for the released sizes, the encoder-decoder, checkpoint import and
export (terratorch's state-dict layout)."""
from jaxvit.models.terramind.config import KNOWN, ModalitySpec, TerraMindConfig, resolve, terramind_config
from jaxvit.models.terramind.model import TerraMind, init_params, param_shapes
from jaxvit.models.terramind.weights import load_terramind, save_terramind

__all__ = ["KNOWN", "ModalitySpec", "TerraMind", "TerraMindConfig", "init_params", "load_terramind", "param_shapes",
           "resolve", "save_terramind", "terramind_config"]
