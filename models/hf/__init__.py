"""Hugging Face-format causal LMs in JAX: load a model directory into a flax.nnx decoder with the contract of
the in-house transformer, tokenize with its tokenizer, and export in-house models as GPT-2 checkpoints.

    model, tok = models.hf.load_pretrained("path/to/Qwen2.5-0.5B")         # or a hub name in the local cache
    program = LMProgram.from_prompt(model, "Once upon a time", 32, tokenizer=tok)
"""

from .config import SUPPORTED_MODEL_TYPES, DecoderConfig, config_from_hf
from .decoder import Decoder
from .export import save_pretrained
from .pretrained import load_pretrained
from .tokenizer import HFTokenizer

__all__ = ["load_pretrained", "save_pretrained", "Decoder", "DecoderConfig", "HFTokenizer", "config_from_hf",
           "SUPPORTED_MODEL_TYPES"]
