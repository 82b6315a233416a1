"""Block-diffusion generation (BD3-LM): block by block, diffusion steps within the current block, and an exact
KV cache of the finished blocks.

The canvas is cut into blocks at multiples of the block size (column 0 is the first column of the padded
prompt). The first block to generate may hold the prompt's tail, which stays fixed. For each block:
  - its masked positions are decoded in `steps` steps by the LLaDA rule with any decoding policy (fixed,
    threshold, factor; remasking low_confidence or random), by MDLM's ancestral rule, or by ReMDM
    (model/remdm.py: `sampler="remdm"`, `remdm=ReMDMConfig(...)`), whose re-masking stays within the current
    block: finished blocks are never revisited, so their cache stays exact. ReMDM steps the block on its own
    time grid (t from 1 to remdm.t_min), then gives still-masked positions the network's argmax;
  - the network sees [clean finished blocks, current block] under the block-causal mask, which is exactly a
    training block's view (model/objectives/block.py).
Because a clean block's keys and values depend only on itself and the clean blocks before it, they never
change once the block is finished: with `kv_cache` they are computed once (one forward of the finished block,
after its last step) and every step of the next block runs only that block's tokens over the cached keys.
Without a cache every step runs the whole visible context. Both compute the same logits (up to float
rounding), so the same generator gives the same tokens; both run the output head only at the block's masked
columns. benchmarks/block_sampling.py measures the two.

Longer output than the model's context (model.max_seq_len): the visible context slides by whole blocks, its
first column re-mapped to rotary position 0 (the cache is refilled once per slide). Variable length: with
`stop_at_eos`, a row stops at its first EOS (the rest of the row is filled with EOS) and takes no further
compute; `stop_fn` stops rows too (filled with pad_id). Every sample is returned: nothing is rejected.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .attention import AttentionBatch, prefix_mask
from .decoding import ban_eos, gumbel_argmax
from .kvcache import KVCache
from .policies import confidences, select


def _context_mask(block_size: int, real: Optional[torch.Tensor]) -> AttentionBatch:
    n = real.shape[1]
    return AttentionBatch("sdpa", False, mask=prefix_mask(n, block_size, key_padding=real, device=real.device))


def _inference(fn):
    """Run fn under inference mode, not only no_grad: a cached step is 16-odd query rows, where eager dispatch
    overhead is a large part of the cost (~10% less per cached forward on CPU). The canvas is cloned on the way
    out, so the caller gets an ordinary tensor it may edit in place (callback and stop_fn see inference
    tensors: they may read and clone them)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone()
    return run


@_inference
def block_generate(model, ids, real, *, objective, mask_id: int, gen_length: int, steps: int, noise,
                   temperature: float = 0.0, remasking: str = "low_confidence", sampler: str = "llada",
                   decode: str = "fixed", threshold: float = 0.9, factor: float = 1.0, kv_cache: bool = True,
                   eos_id: Optional[int] = None, min_new_tokens: int = 0, stop_at_eos: bool = False,
                   stop_fn=None, pad_id: int = 0, callback=None, stats: Optional[dict] = None,
                   window: Optional[int] = None, remdm=None) -> torch.Tensor:
    """ids (B, P) left-padded prompts (real: (B, P) bool or None). Returns (B, P + gen_length). `steps`: decoding
    steps per full block (at most the block size is useful for the LLaDA and MDLM rules). window: the visible
    context (default model.cfg.max_seq_len), a multiple of the block size. remdm: sampler="remdm"'s ReMDMConfig
    (default: rescale)."""
    if sampler == "remdm":
        from .remdm import ReMDMConfig
        remdm = remdm or ReMDMConfig()
        remdm.check()
    bs = objective.block_size
    stats = stats if stats is not None else {}
    for key in ("forwards", "forward_rows", "forward_tokens"):
        stats.setdefault(key, 0)
    window = window or model.cfg.max_seq_len
    window -= window % bs
    if window < bs:
        raise ValueError(f"the context window ({window}) must hold at least one block of {bs} tokens")
    B, P = ids.shape
    device = ids.device
    total = P + gen_length
    x = torch.cat([ids, torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)], 1)
    real = torch.ones(B, total, dtype=torch.bool, device=device) if real is None else \
        torch.cat([real, torch.ones(B, gen_length, dtype=torch.bool, device=device)], 1)
    active = torch.ones(B, dtype=torch.bool, device=device)
    n_layers = model.cfg.n_layers
    cache, cache_off, cached_to = None, None, 0

    def count(rows_n, tokens):
        stats["forwards"] += 1
        stats["forward_rows"] += rows_n
        stats["forward_tokens"] += rows_n * tokens

    def run_cached(rows, a, e, off, at):
        """Forward columns [a, e) over the cache (clean keys of [off, a)). at: None (logits of every column,
        (len(rows), e - a, V)), or a bool (len(rows), e - a) of the columns that need logits ((N, V), row-major:
        the output head runs only there; all False for the store forward of a finished block)."""
        nonlocal cache, cache_off, cached_to
        if cache is None or cache_off != off:  # first use, or the window slid: refill the clean context
            key_real = real[:, off:off + window]
            cache = KVCache(n_layers, B, window, causal=False, prefix_only=True,
                            key_real=None if bool(key_real.all()) else _pad_to(key_real, window))
            cache_off, cached_to = off, off
        # All rows: no row index for the cache, whose indexed read would copy every cached key and value.
        crows = None if len(rows) == B else rows
        if cached_to < a:  # clean blocks not yet cached (the prompt, or after a slide)
            cache.fill(crows)
            model(x[rows, off:a], attn=_context_mask(bs, real[rows, off:a]), logits_at=_none(len(rows), a - off,
                                                                                           device), kv_cache=cache)
            count(len(rows), a - off)
            cached_to = a
        if a == off:  # nothing before the block: a fill forward of the block alone
            cache.fill(crows)
            kw = {"attn": _context_mask(bs, real[rows, a:e])}
        else:
            cache.reuse(a - off, crows)
            kw = {}
        out = model(x[rows, a:e], kv_cache=cache, logits_at=at, **kw)
        count(len(rows), e - a)
        return out

    def run_full(rows, a, e, off, at):
        """The same logits without a cache: the whole visible context [off, e) runs, the head only at `at`."""
        full_at = _none(len(rows), e - off, device)
        full_at[:, a - off:] = True if at is None else at
        out = model(x[rows, off:e], attn=_context_mask(bs, real[rows, off:e]), logits_at=full_at)
        count(len(rows), e - off)
        return out.view(len(rows), e - a, -1) if at is None else out

    first = (P // bs) * bs
    for a in range(first, total, bs):
        e = min(total, a + bs)
        off = max(0, -(-(e - window) // bs) * bs)  # slide by whole blocks so that [off, e) fits the window
        lo = max(a, P)  # generated columns of this block (the prompt's tail stays)
        n_steps = max(1, round(steps * (e - lo) / bs))
        if sampler == "remdm":
            forward = (lambda rows: run_cached(rows, a, e, off, None)) if kv_cache else \
                (lambda rows: run_full(rows, a, e, off, None))
            _remdm_block(x, a, e, lo, active, forward, objective=objective, cfg=remdm, steps=n_steps,
                         mask_id=mask_id, temperature=temperature, noise=noise, ban=lambda lg: ban_eos(
                             lg, eos_id, a - P, min_new_tokens), callback=callback)
        for s in range(0 if sampler == "remdm" else n_steps):
            block = x[:, a:e]
            is_mask = (block == mask_id) & active[:, None]
            is_mask[:, :lo - a] = False
            remaining = is_mask.sum(1)
            if not bool(remaining.any()):
                break
            rows = (remaining > 0).nonzero().squeeze(1)
            # Logits only at the masked columns, row-major: the same order as is_mask's (rows without masks
            # contribute nothing to either).
            lg = (run_cached if kv_cache else run_full)(rows, a, e, off, is_mask[rows]).float()
            if eos_id is not None and a - P < min_new_tokens:  # on the masked columns only
                ban_eos(lg, eos_id, a - P, min_new_tokens, cols=is_mask.nonzero()[:, 1])
            if mask_id < lg.shape[-1]:
                lg[:, mask_id] = float("-inf")  # never propose the mask itself (MDLM's SUBS)
            u = noise.masked(is_mask, lg.shape[-1]) if temperature > 0 else None
            picked = gumbel_argmax(lg, temperature, u=u)
            pred = block.clone()
            pred[is_mask] = picked
            if sampler == "mdlm":
                t, t_next = 1.0 - s / n_steps, 1.0 - (s + 1) / n_steps
                take = is_mask & (noise.rows(remaining > 0, e - a) < objective.unmask_prob(t, t_next))
            else:
                take = select(decode, confidences(lg, picked, is_mask, remasking, noise), is_mask, n_steps - s,
                              threshold=threshold, factor=factor)
            x[:, a:e] = torch.where(take, pred, block)
            if callback is not None:
                callback(s, x)
        if stop_at_eos:  # variable length: everything after a row's first EOS becomes EOS, and the row stops
            gen = x[:, P:]
            is_eos = gen == eos_id
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(active, gen.shape[1],
                                                                                         dtype=torch.long))
            after = torch.arange(gen.shape[1], device=device)[None, :] > first_eos[:, None]
            x[:, P:] = torch.where(after, torch.full_like(gen, eos_id), gen)
            active &= ~is_eos[:, :e - P].any(1)
        if stop_fn is not None and e < total:
            done = stop_fn(x[:, P:e]).to(device) & active
            x[done, e:] = pad_id
            active &= ~done
        if e < total and bool(active.any()) and kv_cache:
            nxt_e = min(total, e + bs)
            nxt_off = max(0, -(-(nxt_e - window) // bs) * bs)
            if nxt_off == off:  # the finished block's clean keys go into the cache (skipped when sliding)
                rows = active.nonzero().squeeze(1)
                run_cached(rows, a, e, off, _none(len(rows), e - a, device))
                cached_to = e
        if not bool(active.any()):
            break
    x[:, P:] = torch.where(x[:, P:] == mask_id, torch.full_like(x[:, P:], pad_id if not stop_at_eos else eos_id),
                           x[:, P:])
    return x


def _remdm_block(x, a: int, e: int, lo: int, active, forward, *, objective, cfg, steps: int, mask_id: int,
                 temperature: float, noise, ban, callback) -> None:
    """ReMDM within the block [a, e) of the canvas x (in place): `steps` steps of model.remdm.remdm_step on
    the reference's time grid over the block's generated columns [lo, e) of the active rows (a row's decoded
    tokens may be re-masked, so every active row runs every step), then the argmax where masks remain.
    forward(rows) -> logits (len(rows), e - a, V) of the block given its clean past."""
    from .remdm import ReMDMState, nucleus, remdm_step, time_grid
    B = x.shape[0]
    temp = temperature if temperature > 0 else 1.0  # ReMDM has no greedy mode (as model/remdm.py)
    state = ReMDMState((B, e - a), x.device)
    movable = active[:, None] & (torch.arange(a, e, device=x.device) >= lo)[None, :]

    def logits_now():
        rows = active.nonzero().squeeze(1)
        sub = forward(rows)
        logits = sub.new_zeros(B, e - a, sub.shape[-1])
        logits[rows] = sub
        ban(logits)
        if mask_id < logits.shape[-1]:
            logits[..., mask_id] = float("-inf")  # never propose the mask itself (MDLM's SUBS)
        return logits.double()
    for s_no, (t, s) in enumerate(time_grid(steps, cfg.t_min)):
        if not bool(active.any()):
            return
        p = torch.softmax(logits_now() / temp, -1)
        p = nucleus(p.reshape(-1, p.shape[-1]), cfg.top_p).reshape(p.shape)
        u = noise.rows(active, e - a)
        x[:, a:e] = remdm_step(p, x[:, a:e], t, s, cfg, mask_id=mask_id, u=u, objective=objective, state=state,
                               active=movable)
        if callback is not None:
            callback(s_no, x)
    left = (x[:, a:e] == mask_id) & movable
    if bool(left.any()):  # the reference's noise_removal: the argmax at t_min
        x[:, a:e] = torch.where(left, logits_now().argmax(-1), x[:, a:e])


def _none(rows: int, n: int, device) -> torch.Tensor:
    return torch.zeros(rows, n, dtype=torch.bool, device=device)


def _pad_to(real: torch.Tensor, n: int) -> torch.Tensor:
    if real.shape[1] >= n:
        return real
    return torch.cat([real, torch.ones(real.shape[0], n - real.shape[1], dtype=torch.bool, device=real.device)], 1)
