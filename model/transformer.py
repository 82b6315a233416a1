"""Llama-style transformer, bidirectional by default.

Pre-norm RMSNorm, rotary position embeddings, SwiGLU feed-forward, no biases, optional grouped KV heads,
untied embedding and output head. Plain PyTorch: parallelism is applied from outside (pretrain/parallel.py).

Precision: the RoPE table is complex64. FSDP2 casts floating-point forward arguments of every unit to its
bf16 `param_dtype`; a complex tensor is not floating point, so every layout rotates with the same fp32-exact
angles. (A real (cos, sin) table would arrive in bf16 under FSDP and in fp32 elsewhere.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionBatch, attention
from .config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> torch.Tensor:
    """(max_len, head_dim / 2) complex64 table exp(i * position * frequency)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, H, L, D) by the complex table (L, D/2): one complex multiply
    in fp32 (on CPU ~10x faster forward+backward than the rotate-half formulation)."""
    if not table.is_complex():
        raise TypeError(f"the RoPE table must be complex64 (got {table.dtype}): a real table would be rounded by "
                        "FSDP's bf16 input cast")
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * table).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal, self.backend = cfg.causal, cfg.attn_backend
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, rope, batch: Optional[AttentionBatch] = None, kv_cache=None):
        b, L, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(b, L, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, L, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, L, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, causal=self.causal, backend=self.backend, batch=batch, kv_cache=kv_cache)
        return self.wo(out.transpose(1, 2).reshape(b, L, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, rope, batch: Optional[AttentionBatch] = None, kv_cache=None):
        # (three positional arguments: the tensor-parallel input plan of `attention` lists exactly these)
        x = x + self.attention(self.attention_norm(x), rope, batch, kv_cache=kv_cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unresolved: set it, or build the model after the data is loaded")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = OutputHead(cfg.dim, cfg.vocab_size)
        self.register_buffer("rope", rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .double() would cast the complex RoPE table to a real dtype (dropping
        # its imaginary part): keep it out of every cast and only follow the model to its device.
        rope = self._buffers.pop("rope", None)
        try:
            super()._apply(fn, recurse)
        finally:
            if rope is not None:
                device = next((p.device for p in self.parameters()), rope.device)
                if rope.device != device:
                    rope = torch.empty_like(rope, device=device) if rope.is_meta else rope.to(device)
                self._buffers["rope"] = rope
        return self

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.output.weight.device).manual_seed(seed)
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm gains
            else:
                p.normal_(0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else std, generator=gen)
        self.rope.copy_(rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                    device=self.rope.device))

    def hidden(self, tokens, doc_ids=None, key_padding=None, kv_cache=None):
        L = tokens.shape[1]
        # With a KV cache the tokens sit at canvas columns kv_cache.positions(L) (model/kvcache.py).
        cols = kv_cache.positions(L) if kv_cache is not None else slice(0, L)
        if cols.stop > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {cols.stop} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        rope = self.rope[cols]
        # The mask (or block mask, or varlen segments) is built once here and shared by every layer.
        batch = AttentionBatch.build(doc_ids, key_padding, causal=self.cfg.causal, backend=self.cfg.attn_backend,
                                     seq_len=L, device=tokens.device, dtype=self.compute_dtype(h))
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, batch, kv_cache=kv_cache.layer(i) if kv_cache is not None else None)
        return self.norm(h)

    @staticmethod
    def compute_dtype(h: torch.Tensor) -> torch.dtype:
        return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype

    def forward(self, tokens, doc_ids=None, key_padding=None, logits_at: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, ce_chunk: int = 0, kv_cache=None):
        """tokens: (B, L) ids. Returns logits (B, L, V), or (N, V) for the N positions where the boolean
        `logits_at` (B, L) is True: the loss needs logits only at masked positions, so the output head (the
        largest matmul for small models) runs only there. With `targets` (N,) it returns the fp32
        cross-entropy (N,) at those positions instead, `ce_chunk` rows of logits at a time (0: all at once)."""
        h = self.hidden(tokens, doc_ids, key_padding, kv_cache=kv_cache)
        if logits_at is not None:
            h = h[logits_at]
        if targets is None:
            return self.output(h)
        if getattr(self.output, "vocab_parallel", False):
            # Tensor parallel: vocab-sharded logits, cross-entropy loss-parallel (inside parallel.loss_scope).
            return F.cross_entropy(self.output(h).float(), targets, reduction="none")
        return self.output(h, targets=targets, chunk=ce_chunk)


class OutputHead(nn.Linear):
    """The untied output projection. Called with targets it returns the per-row fp32 cross-entropy, computed
    `chunk` rows at a time with the chunk's logits recomputed in backward, so at most (chunk, V) logits exist
    at once (a 126k vocabulary makes the full (N, V) logits the largest activation of the step). The same
    module call either way, so FSDP's unit hooks see one forward."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, h, targets: Optional[torch.Tensor] = None, chunk: int = 0):
        if targets is None:
            return super().forward(h)
        if chunk <= 0 or h.shape[0] <= chunk:
            return self._ce(h, targets)
        from torch.utils.checkpoint import checkpoint
        parts = [checkpoint(self._ce, hc, tc, use_reentrant=False)
                 for hc, tc in zip(h.split(chunk), targets.split(chunk))]
        return torch.cat(parts)

    def _ce(self, h, targets):
        return F.cross_entropy(F.linear(h, self.weight).float(), targets, reduction="none")
