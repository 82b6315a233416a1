"""Llama-style transformer, bidirectional by default.

Pre-norm RMSNorm, rotary position embeddings, SwiGLU feed-forward, no biases, optional grouped KV heads,
untied embedding and output head. Plain PyTorch: parallelism is applied from outside (pretrain/engines/parallel.py).

Time conditioning (`model.time_conditioning=adaln`): adaLN-zero as in DiT / MDLM / DUO. The noise level t (B,)
in [0, 1] is embedded sinusoidally (DiT's frequency table, applied to 1000 t), an MLP maps it to a cond_dim
vector c, SiLU(c) feeds per block a Linear(cond_dim, 6 dim) giving shift / scale / gate for attention and the
feed-forward, and a Linear(cond_dim, 2 dim) giving shift / scale of the final norm's output:

    x = x + attention(norm(x) * (1 + scale_a) + shift_a) * (1 + gate_a)      (the same for the feed-forward)

Every modulation Linear is zero-initialised. Deliberately unlike DiT/MDLM (whose gate multiplies the branch
as g, so each block starts as the identity and drops its attention and MLP), the gate here is (1 + g): with
g = shift = scale = 0 the block computes exactly x + attention(norm(x)), so a time-conditioned model starts
as the unconditioned model with the same seed, bit for bit, and learns to depart from it. The conditioning
parameters are registered after the existing ones and initialised after them (init_weights), so the
unconditioned weights do not depend on the option and `none` builds exactly the model without it.

Precision: the RoPE table is complex64. FSDP2 casts floating-point forward arguments of every unit to its
bf16 `param_dtype`; a complex tensor is not floating point, so every layout rotates with the same fp32-exact
angles. (A real (cos, sin) table would arrive in bf16 under FSDP and in fp32 elsewhere.)
"""
from __future__ import annotations

import math
from typing import Callable, Optional

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


TIME_SCALE = 1000.0  # the sinusoidal embedding sees 1000 t (DiT's timesteps run to 1000)
TIME_FREQS = 256  # sinusoidal features of the time embedding (DiT's frequency_embedding_size)


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQS, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) noise levels in [0, 1] -> (B, dim) fp32 [cos(1000 t f_k), sin(1000 t f_k)] with
    f_k = max_period^(-k / (dim/2)), k < dim/2 (DiT's / GLIDE's frequency table)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (TIME_SCALE * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def is_conditioning(name: str) -> bool:
    """Whether a parameter name (any wrapper prefix) belongs to the time conditioning: the time embedding or a
    modulation layer. Parallel layouts replicate these across tensor-parallel ranks."""
    return "time_embed." in name or "modulation." in name


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: h * (1 + scale) + shift (exactly h when both are zero)."""
    return h * (1 + scale) + shift


class TimeEmbedding(nn.Module):
    """t's sinusoidal features -> SiLU(MLP(features)) (B, cond_dim): the conditioning vector every modulation
    layer reads (DiT's TimestepEmbedder, with MDLM's SiLU on its output)."""

    def __init__(self, cond_dim: int, freqs: int = TIME_FREQS):
        super().__init__()
        self.mlp_in = nn.Linear(freqs, cond_dim)
        self.mlp_out = nn.Linear(cond_dim, cond_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The features are computed in fp32 (from an fp32 t) and meet the weights in their dtype (bf16 under
        # FSDP's mixed precision, where autocast is off).
        h = self.mlp_in(features.to(self.mlp_in.weight.dtype))
        return F.silu(self.mlp_out(F.silu(h)))


class Modulation(nn.Module):
    """Linear(cond_dim, n * dim) of the conditioning vector, zero-initialised. `chunks` splits its (B, n * dim)
    output into n (B, 1, dim) vectors that broadcast over the sequence."""

    def __init__(self, cond_dim: int, dim: int, n: int):
        super().__init__()
        self.n = n
        self.proj = nn.Linear(cond_dim, n * dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.proj(cond)

    def chunks(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(cond)[:, None].chunk(self.n, dim=-1)


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
        if cfg.time_conditioning == "adaln":  # registered last: the other parameters keep their order
            self.modulation = Modulation(cfg.cond_dim, cfg.dim, 6)

    def forward(self, x, rope, batch: Optional[AttentionBatch] = None, kv_cache=None, cond=None):
        # (three positional arguments: the tensor-parallel input plan of `attention` lists exactly these;
        # the conditioning vector comes as the keyword `cond`, (B, cond_dim), None without time conditioning)
        if cond is None:
            x = x + self.attention(self.attention_norm(x), rope, batch, kv_cache=kv_cache)
            return x + self.feed_forward(self.ffn_norm(x))
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation.chunks(cond)
        h = self.attention(modulate(self.attention_norm(x), shift_a, scale_a), rope, batch, kv_cache=kv_cache)
        x = x + h * (1 + gate_a)
        return x + self.feed_forward(modulate(self.ffn_norm(x), shift_f, scale_f)) * (1 + gate_f)


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
        # Time conditioning: registered after every other parameter (see init_weights); absent for `none`.
        self.time_embed: Optional[TimeEmbedding] = None
        self.final_modulation: Optional[Modulation] = None
        if cfg.time_conditioning == "adaln":
            self.time_embed = TimeEmbedding(cfg.cond_dim)
            self.final_modulation = Modulation(cfg.cond_dim, cfg.dim, 2)
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
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers).

        Time conditioning (adaln) is initialised after all the other parameters, from the same generator: the
        time embedding's weights Normal(0, init_std) and its biases zero, every modulation layer zero (adaLN-
        zero). So the other weights are those of the unconditioned model with the same seed."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.output.weight.device).manual_seed(seed)
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        conditioning = []
        # Submodules that initialise themselves (an objective's learned parameters, e.g. GenMD4's exponents).
        own = [m for m in self.modules() if getattr(m, "initialises_itself", False)]
        skip = {id(p) for m in own for p in m.parameters()}
        for name, p in self.named_parameters():
            if id(p) in skip:
                continue
            if is_conditioning(name):
                conditioning.append((name, p))
            elif p.ndim == 1:
                p.fill_(1.0)  # norm gains
            else:
                p.normal_(0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else std, generator=gen)
        for name, p in conditioning:
            if "modulation." in name or p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
        self.rope.copy_(rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                    device=self.rope.device))
        for m in own:
            m.reset_parameters()

    def conditioning(self, t: Optional[torch.Tensor], batch_size: int) -> Optional[torch.Tensor]:
        """The conditioning vector (B, cond_dim) of noise levels t (B,), or None without time conditioning."""
        if self.time_embed is None:
            if t is not None:
                raise ValueError("the model was given a noise level t, but it is not time-conditioned "
                                 "(model.time_conditioning=none): drop t, or build the model with "
                                 "model.time_conditioning=adaln")
            return None
        if t is None:
            raise ValueError("model.time_conditioning=adaln: the model needs the noise level of every row, "
                             "model(tokens, ..., t=t) with t a (B,) float tensor in [0, 1]")
        if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) != (batch_size,):
            raise ValueError(f"t must be a ({batch_size},) float tensor of noise levels in [0, 1] (one per row), "
                             f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}"
                             f"{' ' + str(t.dtype) if torch.is_tensor(t) else ''}")
        return self.time_embed(timestep_features(t))

    def hidden(self, tokens, doc_ids=None, key_padding=None, kv_cache=None, t=None, attn=None, positions=None,
               mask_known: bool = False, soft_input=None):
        cond = self.conditioning(t, tokens.shape[0])
        L = tokens.shape[1]
        # With a KV cache the tokens sit at canvas columns kv_cache.positions(L) (model/kvcache.py).
        cols = kv_cache.positions(L) if kv_cache is not None else slice(0, L)
        if positions is not None:  # explicit rotary positions (block diffusion's 2L input: 0..L-1 twice)
            if kv_cache is not None or positions.shape != (L,):
                raise ValueError(f"positions must be a ({L},) tensor and cannot be combined with a KV cache")
            cols = positions
        # (explicit positions are checked on the host only: a device tensor would cost a sync per forward)
        last = cols.stop if positions is None else \
            (int(cols.max()) + 1 if L and cols.device.type == "cpu" else 0)
        if last > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {last} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens) if soft_input is None else self.soft_embeddings(soft_input, tokens)
        rope = self.rope[cols]
        # The mask (or block mask, or varlen segments) is built once here and shared by every layer; `attn`, a
        # caller's prebuilt AttentionBatch (a custom mask, e.g. block diffusion's), replaces it (its dense boolean
        # mask made additive in the compute dtype here, once).
        batch = attn.for_dtype(self.compute_dtype(h)) if attn is not None else AttentionBatch.build(
            doc_ids, key_padding, causal=self.cfg.causal, backend=self.cfg.attn_backend, seq_len=L,
            device=tokens.device, dtype=self.compute_dtype(h), mask_known=mask_known)
        extra = {} if cond is None else {"cond": cond}
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, batch, kv_cache=kv_cache.layer(i) if kv_cache is not None else None, **extra)
        h = self.norm(h)
        if cond is not None:
            h = modulate(h, *self.final_modulation.chunks(cond))
        return h

    def soft_embeddings(self, soft_input, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) embeddings of a soft input (DUO's curriculum, model/objectives/uniform.py): at each
        position a weighted sum of token embeddings, given either as dense weights (B, L, V) (the result is
        weights @ E) or sparse as a pair (ids (B, L, k) long, weights (B, L, k)), the sum over k, so no (B, L, V)
        tensor is needed. `tokens` (B, L) still sets the shape (and is what masks and caches see).

        The embedding table is read through the embedding module (one call on the V ids), so FSDP gathers its
        weight and its gradient flows back as for token ids. Under tensor parallelism that call returns only a
        shard of the table, which this does not combine: refused."""
        V = self.cfg.vocab_size
        table = self.tok_embeddings(torch.arange(V, device=tokens.device)[None])[0]
        if table.shape[0] != V:
            raise ValueError("a soft input (diffusion.curriculum_steps > 0) is not supported under tensor "
                             "parallelism: set parallel.tp=1 or diffusion.curriculum_steps=0")
        B, L = tokens.shape
        if torch.is_tensor(soft_input):
            if tuple(soft_input.shape) != (B, L, V):
                raise ValueError(f"dense soft input must be (B, L, V) = {(B, L, V)}, got {tuple(soft_input.shape)}")
            return soft_input.to(table.dtype) @ table
        ids, weights = soft_input
        if ids.shape != weights.shape or tuple(ids.shape[:2]) != (B, L):
            raise ValueError(f"sparse soft input: ids and weights must both be (B, L, k) with (B, L) = {(B, L)}; "
                             f"got {tuple(ids.shape)} and {tuple(weights.shape)}")
        k = ids.shape[-1]
        out = F.embedding_bag(ids.reshape(-1, k), table, per_sample_weights=weights.reshape(-1, k).to(table.dtype),
                              mode="sum")
        return out.view(B, L, -1)

    @staticmethod
    def compute_dtype(h: torch.Tensor) -> torch.dtype:
        return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype

    def forward(self, tokens, doc_ids=None, key_padding=None, logits_at: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, ce_chunk: int = 0, kv_cache=None,
                t: Optional[torch.Tensor] = None, row_loss: Optional[RowLoss] = None, attn=None,
                positions: Optional[torch.Tensor] = None, mask_known: bool = False, soft_input=None):
        """tokens: (B, L) ids. Returns logits (B, L, V), or (N, V) for the N positions where the boolean
        `logits_at` (B, L) is True: the loss needs logits only at masked positions, so the output head (the
        largest matmul for small models) runs only there. With `targets` (N,) it returns the fp32
        cross-entropy (N,) at those positions instead, `ce_chunk` rows of logits at a time (0: all at once).

        t: (B,) noise levels in [0, 1], required with model.time_conditioning=adaln and refused without.

        row_loss: a per-row loss of the objective's own, `row_loss(logits (n, V) fp32, rows: slice) -> (n,)`,
        with `rows` indexing the flattened selected positions (row-major over `logits_at`, or over every
        position (B * L) when `logits_at` is None) so it can index per-row auxiliaries (targets, noisy tokens,
        weights). Returns the (N,) per-row losses, computed `ce_chunk` rows at a time with each chunk's logits
        recomputed in backward (0: all at once), so the (N, V) logits never exist whole. Under tensor
        parallelism the vocab-sharded logits are gathered one chunk at a time (see `_vocab_parallel_rows`).

        attn: a prebuilt model.attention.AttentionBatch (a custom mask, built once per batch by the caller and
        shared by every layer and recompute); doc_ids/key_padding/causal are then not consulted. positions:
        (L,) rotary positions of the tokens (default 0..L-1). Block diffusion uses both (model/objectives/block.py).

        logits_at may also be a (N,) long tensor of flat row-major positions (the training step computes them on
        the host: no sync), or a slice over positions (the AR baseline's every-position-but-the-last).
        mask_known: the caller checked on the host that doc_ids / key_padding mask something (no device sync).
        soft_input: embed a weighted mixture of tokens per position instead of `tokens` (see soft_embeddings)."""
        if targets is not None and row_loss is not None:
            raise ValueError("give either targets (cross-entropy) or row_loss (a custom per-row loss), not both")
        h = self.hidden(tokens, doc_ids, key_padding, kv_cache=kv_cache, t=t, attn=attn, positions=positions,
                        mask_known=mask_known, soft_input=soft_input)
        if isinstance(logits_at, slice):
            h = h[:, logits_at].reshape(-1, h.shape[-1])
        elif logits_at is not None:
            h = h[logits_at] if logits_at.dtype == torch.bool else h.flatten(0, 1).index_select(0, logits_at)
        elif row_loss is not None:
            h = h.reshape(-1, h.shape[-1])  # every position, row-major
        if row_loss is not None:
            if getattr(self.output, "vocab_parallel", False):
                return _vocab_parallel_rows(self.output(h), row_loss, ce_chunk)
            return self.output(h, row_loss=row_loss, chunk=ce_chunk)
        if targets is None:
            return self.output(h)
        if getattr(self.output, "vocab_parallel", False):
            # Tensor parallel: vocab-sharded logits, cross-entropy loss-parallel (inside parallel.loss_scope).
            return F.cross_entropy(self.output(h).float(), targets, reduction="none")
        return self.output(h, targets=targets, chunk=ce_chunk)


RowLoss = Callable[[torch.Tensor, slice], torch.Tensor]  # (logits (n, V) fp32, rows) -> (n,) per-row loss


def _row_loss_checked(row_loss: RowLoss, logits: torch.Tensor, start: int) -> torch.Tensor:
    n = logits.shape[0]
    out = row_loss(logits, slice(start, start + n))
    if not torch.is_tensor(out) or tuple(out.shape) != (n,):
        raise ValueError(f"row_loss must return one loss per row, shape ({n},); got "
                         f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    return out


def _vocab_parallel_rows(logits, row_loss: RowLoss, chunk: int) -> torch.Tensor:
    """A custom row loss on the tensor-parallel head's logits. Inside parallel.loss_scope they are vocab-sharded
    (N, V/tp) DTensors: each chunk of rows is gathered to the full vocabulary (redistribute to Replicate) and
    handed to row_loss as a plain fp32 tensor, the gather recomputed in backward, so the full (N, V) logits
    never exist. Every tp rank computes the same loss on the same rows, so the gathered logits' gradient is
    the same on every rank (replicated) and flows back to each rank's vocabulary shard. Outside the scope the
    head already returns full plain logits."""
    from torch.utils.checkpoint import checkpoint
    sharded = hasattr(logits, "redistribute")

    def rows(part, start):
        if sharded:
            from torch.distributed.tensor import Replicate
            part = part.redistribute(part.device_mesh, [Replicate()] * part.device_mesh.ndim).to_local()
        return _row_loss_checked(row_loss, part.float(), start)
    n = logits.shape[0]
    if chunk <= 0 or n <= chunk:
        return rows(logits, 0)
    return torch.cat([checkpoint(rows, logits[a:a + chunk], a, use_reentrant=False) for a in range(0, n, chunk)])


class OutputHead(nn.Linear):
    """The untied output projection. Called with targets it returns the per-row fp32 cross-entropy, computed
    `chunk` rows at a time with the chunk's logits recomputed in backward, so at most (chunk, V) logits exist
    at once (a 126k vocabulary makes the full (N, V) logits the largest activation of the step). Called with
    row_loss it does the same for a custom per-row loss (Transformer.forward). The same module call either
    way, so FSDP's unit hooks see one forward."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, h, targets: Optional[torch.Tensor] = None, chunk: int = 0,
                row_loss: Optional[RowLoss] = None):
        if row_loss is not None:
            if chunk <= 0 or h.shape[0] <= chunk:
                return self._rows(h, 0, row_loss)
            from torch.utils.checkpoint import checkpoint
            return torch.cat([checkpoint(self._rows, hc, i * chunk, row_loss, use_reentrant=False)
                              for i, hc in enumerate(h.split(chunk))])
        if targets is None:
            return super().forward(h)
        if chunk <= 0 or h.shape[0] <= chunk:
            return self._ce(h, targets)
        from torch.utils.checkpoint import checkpoint
        parts = [checkpoint(self._ce, hc, tc, use_reentrant=False)
                 for hc, tc in zip(h.split(chunk), targets.split(chunk))]
        return torch.cat(parts)

    def _rows(self, h, start: int, row_loss: RowLoss):
        return _row_loss_checked(row_loss, F.linear(h, self.weight).float(), start)

    def _ce(self, h, targets):
        return F.cross_entropy(F.linear(h, self.weight).float(), targets, reduction="none")
