"""Parameter and FLOP accounting."""
from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig


def count_params(model: nn.Module) -> dict[str, int]:
    """Total, embedding (input table + output head) and non-embedding parameter counts.

    Works on meta-device models, so the largest configs are counted without memory."""
    total = emb = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.startswith(("tok_embeddings.", "output.")):
            emb += n
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def flops_per_token(cfg: ModelConfig, seq_len: int, n_nonembed: int) -> float:
    """Training FLOPs per token (forward + backward):

        6 * N_nonembed                 weight matmuls
      + 6 * d_model * vocab            output head
      + 12 * n_layers * d_model * L    attention scores and values over the full (bidirectional) sequence

    A causal model is counted the same: kernels do not skip the masked half in general."""
    return 6 * n_nonembed + 6 * cfg.dim * cfg.vocab_size + 12 * cfg.n_layers * cfg.dim * seq_len
