"""TerraMind's modality tokenizers (S2L2A, S1GRD, S1RTC, DEM, NDVI) in Flax: ViT encoder -> FSQ token ids,
and a diffusion (patched UNet + DDIM) decoder from ids or soft codes back to images. See model.py."""
from jaxvit.models.terramind.tokenizer.config import VARIANTS, TokenizerConfig, tokenizer_config
from jaxvit.models.terramind.tokenizer.fsq import codebook, expected_codes, ids_to_codes
from jaxvit.models.terramind.tokenizer.model import (Tokenizer, decode, decode_ids, decode_probs, encode_ids,
                                                     init_params)
from jaxvit.models.terramind.tokenizer.weights import export_state_dict, import_params, load_tokenizer, save_tokenizer

__all__ = ["VARIANTS", "TokenizerConfig", "tokenizer_config", "codebook", "expected_codes", "ids_to_codes",
           "Tokenizer", "decode", "decode_ids", "decode_probs", "encode_ids", "init_params", "export_state_dict",
           "import_params", "load_tokenizer", "save_tokenizer"]
