"""Model shape: one dataclass, plus the named sizes users pick from."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional


TIME_CONDITIONING = ("none", "adaln")


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # named size this config started from (see PRESETS)
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: multi-head attention (n_kv_heads == n_heads)
    ffn_dim: int = 512  # SwiGLU hidden size
    vocab_size: Optional[int] = None  # None: taken from the data (tokenizer size incl. specials)
    mask_id: Optional[int] = None  # None: taken from the data
    max_seq_len: int = 4096  # RoPE table length
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    causal: bool = False  # True: autoregressive baseline with the same code
    # auto: sdpa on CPU; on CUDA flash-attn (if installed) > FlexAttention > sdpa for masked batches
    attn_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    init_std: float = 0.02
    # Conditioning on the noise level t (model/transformer.py): none, or adaLN-zero (DiT / MDLM / DUO): a
    # sinusoidal embedding of 1000 t, an MLP to a cond_dim vector, and per block a zero-initialised
    # Linear(cond_dim, 6 dim) giving the shift / scale / gate of attention and feed-forward (an exact no-op at
    # initialisation). none leaves the model exactly as without the option (same parameters, same weights).
    time_conditioning: Literal["none", "adaln"] = "none"
    cond_dim: int = 128  # width of the conditioning vector (time_conditioning=adaln)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE (model.dim / model.n_heads)")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.kv_heads}")
        if self.vocab_size is not None and self.mask_id is not None and not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"model.mask_id={self.mask_id} must lie in [0, model.vocab_size={self.vocab_size})")
        for key in ("dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len", "cond_dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.time_conditioning not in TIME_CONDITIONING:
            raise ValueError(f"model.time_conditioning={self.time_conditioning!r}; choices: "
                             f"{', '.join(TIME_CONDITIONING)}")


def _smdm(layers: int, heads: int, dim: int) -> ModelConfig:
    # SMDM scaling grid: MHA, SwiGLU hidden 4*d, Llama-2 vocabulary (32000 + mask).
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, ffn_dim=4 * dim, vocab_size=32001,
                       mask_id=32000, max_seq_len=2048)


# size name: layers/heads/d_model, where size = non-embedding parameters (science.md, section 3)
_SMDM_GRID = {
    "6M": (6, 4, 256), "19M": (8, 6, 384), "34M": (8, 8, 512), "48M": (9, 9, 576), "66M": (10, 10, 640),
    "85M": (13, 10, 640), "113M": (12, 12, 768), "142M": (15, 12, 768), "170M": (18, 12, 768),
    "180M": (14, 14, 896), "206M": (16, 14, 896), "231M": (18, 14, 896), "268M": (16, 16, 1024),
    "302M": (18, 16, 1024), "336M": (20, 16, 1024), "472M": (18, 10, 1280), "551M": (21, 10, 1280),
    "571M": (18, 11, 1408), "629M": (24, 10, 1280), "666M": (21, 11, 1408), "717M": (19, 12, 1536),
    "761M": (24, 11, 1408), "831M": (22, 12, 1536), "944M": (25, 12, 1536), "1028M": (20, 14, 1792),
    "1233M": (24, 14, 1792), "1476M": (22, 16, 2048), "1678M": (25, 16, 2048), "2121M": (28, 17, 2176),
}

PRESETS: dict[str, ModelConfig] = {
    # CPU tests; vocabulary comes from the data.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=1024),
    # The 25M shape of benchmarks/train_step.py.
    "bench-25m": ModelConfig(dim=384, n_layers=8, n_heads=6, ffn_dim=1536, vocab_size=8192, mask_id=8191,
                             max_seq_len=1024),
    **{name: _smdm(*shape) for name, shape in _SMDM_GRID.items()},
    # LLaDA-8B (Nie et al. 2025): exact shape of the released base model.
    "llada-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=12288, vocab_size=126464,
                            mask_id=126336, max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        import difflib
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model preset {name!r}.{hint} Choices: {', '.join(PRESETS)}")
    return replace(PRESETS[name], preset=name)
