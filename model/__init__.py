"""Bidirectional (or causal) Llama-style transformer for masked diffusion language models."""
from .config import PRESETS, ModelConfig, get_preset
from .params import count_params, flops_per_token
from .transformer import Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "count_params", "flops_per_token", "get_preset"]
