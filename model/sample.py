"""Sampling from masked diffusion LMs (and AR checkpoints), batched. Used by training (samples at the end of
a run) and by evaluation (eval.generate, the lm-eval model), so it lives in the model package.

Samplers (science.md, section 6):
  - LLaDA ("llada"): start from masks; at every step predict all masked positions of the current block, pick a
    token per position (argmax, or Gumbel-max with temperature in float64) and unmask the positions that the
    decoding policy (model/policies.py) selects: `fixed` keeps the k = ceil(remaining / steps_left) most
    confident (remasking="low_confidence") or k random ones (remasking="random"), LLaDA's even split;
    `threshold` unmasks every position whose confidence exceeds tau and `factor` applies Fast-dLLM's factor
    rule, both at least `fixed`'s count, so a row may finish its block in far fewer steps than planned.
    Semi-autoregressive when block_length < gen_length: blocks left to right, steps split evenly over blocks.
  - MDLM ancestral ("mdlm"): from t to s < t every still-masked position is unmasked with probability
    (t - s) / t to a token drawn from p_theta; a row whose canvas did not change reuses its previous
    prediction (prediction caching), so the number of forward passes is at most the number of steps and often
    much lower when steps exceed the number of tokens.
  - AR checkpoints (model.cfg.causal): plain left to right, one token per forward; kv_cache != "none" uses the
    ordinary (exact) KV cache, so each step runs only the new token.

KV caching for block decoding (kv_cache, model/kvcache.py; Fast-dLLM): the first step of every block runs the
whole canvas and caches every layer's keys and values. Later steps of the block run only
  - "prefix": the current block and the masked suffix after it (prompt and finished blocks from the cache);
  - "dual": the current block only (the masked suffix from the cache too).
The cache is refreshed (a full forward) when a block completes, and also every `refresh_every` steps inside
a block when that is > 0; refresh_every=1 is exactly the uncached sampler. For a bidirectional model this is
an approximation: the cached keys of the prefix and suffix were computed while the block was still masked.

Batched prompts of different lengths are left-padded so every row's generation region starts at the same
column; padded keys are hidden with `key_padding` (diffusion) or with a separate document id (AR, see
`_ar_generate`). RoPE only sees relative positions, so left padding does not change what a row computes.
Rows that have finished their block (or the whole generation) take no compute. Batch invariance: with one
torch.Generator per row (`generator=[g0, g1, ...]`) every random draw of a row comes from its own generator,
so a row's output does not depend on the other rows of its batch; a single generator is shared (draws
interleave across rows, as before).

Classifier-free guidance (LLaDA): logits = uncond + (w + 1) * (cond - uncond), where the unconditional pass
has every prompt token replaced by the mask. EOS controls: `min_new_tokens` forbids EOS before that many
generated tokens; `stop_at_eos` fills every still-masked position after a row's first EOS with EOS (text after
it is discarded anyway), which removes those positions from the schedule and lets finished rows drop out of
the batch. `callback(step, x)` sees the canvas after every step (used for the step-by-step visualisation).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .decoding import GeneratorLike, Noise, ban_eos, forward_logits, gumbel_argmax  # noqa: F401  (re-exported)
from .kvcache import KVCache
from .policies import POLICIES, confidences, select, topk_mask  # noqa: F401  (topk_mask: re-exported)

PromptLike = Union[None, torch.Tensor, Sequence[Sequence[int]]]
KV_CACHES = ("none", "prefix", "dual")


def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's plan of how many tokens to unmask at each of `steps` steps: an even split, remainder first.
    (B,) -> (B, steps). The sampler computes the same numbers on the fly as ceil(remaining / steps_left)."""
    base = n_masked // steps
    rem = n_masked % steps
    out = base[:, None].repeat(1, steps)
    out += (torch.arange(steps, device=n_masked.device)[None] < rem[:, None]).long()
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and the (B, P) bool mask of real tokens."""
    P = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            real[i, P - len(p):] = True
    return ids.to(device), real.to(device)


def _is_causal(model) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(getattr(cfg, "causal", False))


def _block_logits(model, x, real, rows, start, end, *, cache: Optional[KVCache], refresh: bool, kv_mode: str,
                  stats: dict, **common) -> torch.Tensor:
    """Logits of block [start, end) for the given rows (LongTensor, or None for all rows): a full forward
    (which also refreshes the cache), or, with a cache between refreshes, a forward over the block (dual) or
    the block and the suffix (prefix) only."""
    xs = x if rows is None else x[rows]
    rs = real if rows is None or real is None else real[rows]
    n_rows = xs.shape[0] * (2 if common["cfg_scale"] else 1)
    crows = None
    if cache is not None and rows is not None:
        crows = torch.cat([rows, rows + x.shape[0]]) if common["cfg_scale"] else rows
    if cache is None or refresh:
        stats["forward_tokens"] += n_rows * xs.shape[1]
        return forward_logits(model, xs, rs, start, end, kv_cache=None if cache is None else cache.fill(crows),
                               **common)
    win_end = end if kv_mode == "dual" else x.shape[1]
    stats["forward_tokens"] += n_rows * (win_end - start)
    return forward_logits(model, xs[:, start:win_end], None, start, end, kv_cache=cache.reuse(start, crows),
                           offset=start, **common)


def _fill_after_eos(gen: torch.Tensor, mask_id: int, eos_id: int) -> torch.Tensor:
    """Replace every mask after a row's first decoded EOS by EOS. gen: (B, G) generated region. Returns it."""
    is_eos = gen == eos_id
    has = is_eos.any(1)
    if not bool(has.any()):
        return gen
    first = torch.where(has, is_eos.int().argmax(1), torch.full_like(has, gen.shape[1], dtype=torch.long))
    after = torch.arange(gen.shape[1], device=gen.device)[None, :] > first[:, None]
    return torch.where(after & (gen == mask_id), torch.full_like(gen, eos_id), gen)


def _prepare(model, prompt: PromptLike, prompt_mask: Optional[torch.Tensor], batch_size: int, pad_id: int):
    device = next(model.parameters()).device
    if prompt is None:
        ids = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return ids, None
    if isinstance(prompt, torch.Tensor):
        ids = prompt.to(device=device, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        real = None if prompt_mask is None else prompt_mask.to(device=device, dtype=torch.bool)
        if real is not None:
            cols = torch.arange(ids.shape[1], device=device)[None]
            if not bool((real == (cols >= ids.shape[1] - real.sum(1, keepdim=True))).all()):
                raise ValueError("prompt_mask must mark a left-padded batch: the real tokens of each row must "
                                 "be its last ones (use model.sample.left_pad)")
            ids = torch.where(real, ids, torch.full_like(ids, pad_id))
        return ids, real
    ids, real = left_pad(prompt, pad_id, device)
    return ids, real


def check_options(sampler, remasking, decode, threshold, factor, kv_cache, refresh_every, gen_length, steps, *,
                  exact_cache: bool = False):
    """exact_cache: the objective's sampler caches only finished clean blocks (block diffusion), which ReMDM's
    re-masking within the current block never touches."""
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}; choices: low_confidence, random")
    if sampler not in ("llada", "mdlm", "remdm", "psi"):  # psi: uniform / hybrid objectives (their generate)
        raise ValueError(f"unknown sampler {sampler!r}; choices: llada, mdlm, remdm, psi")
    if sampler == "remdm" and (decode != "fixed" or (kv_cache != "none" and not exact_cache)):
        raise ValueError("sampler=remdm re-masks decoded tokens: it takes decode=fixed and kv_cache=none "
                         "(block diffusion checkpoints: any kv_cache, their cache holds finished blocks only)")
    if decode not in POLICIES:
        raise ValueError(f"unknown decode policy {decode!r}; choices: {', '.join(POLICIES)}")
    if decode != "fixed" and (sampler != "llada" or remasking != "low_confidence"):
        raise ValueError(f"decode={decode} selects by confidence: it needs sampler=llada with "
                         f"remasking=low_confidence (got sampler={sampler}, remasking={remasking})")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in [0, 1] (a probability; 0.9 is Fast-dLLM's)")
    if factor <= 0:
        raise ValueError(f"factor={factor} must be positive (Fast-dLLM uses about 1)")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"unknown kv_cache {kv_cache!r}; choices: {', '.join(KV_CACHES)}")
    if refresh_every < 0:
        raise ValueError(f"refresh_every={refresh_every} must be >= 0 (0: refresh only when a block completes)")
    if gen_length <= 0 or steps <= 0:
        raise ValueError(f"gen_length={gen_length} and steps={steps} must be positive")


@torch.no_grad()
def generate(model, prompt: PromptLike = None, *, mask_id: int, gen_length: int, steps: int,
             block_length: Optional[int] = None, temperature: float = 0.0, remasking: str = "low_confidence",
             sampler: str = "llada", generator: GeneratorLike = None, batch_size: int = 1,
             prompt_mask: Optional[torch.Tensor] = None, pad_id: Optional[int] = None, cfg_scale: float = 0.0,
             eos_id: Optional[int] = None, min_new_tokens: int = 0, stop_at_eos: bool = False,
             callback: Optional[Callable[[int, torch.Tensor], None]] = None,
             stop_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, cache: bool = True,
             decode: str = "fixed", threshold: float = 0.9, factor: float = 1.0, kv_cache: str = "none",
             refresh_every: int = 0, stats: Optional[dict] = None, objective=None, remdm=None) -> torch.Tensor:
    """Generate `gen_length` tokens after each prompt.

    prompt: None (unconditional, `batch_size` rows), a (B, P) tensor (left-padded, with `prompt_mask` True at
    real tokens, or unpadded), or a list of token-id lists of any lengths (left-padded here with pad_id,
    default eos_id or 0). Returns (B, P + gen_length): the (padded) prompt followed by the generated tokens;
    no mask token is left. sampler: "llada" (remasking "low_confidence" or "random") or "mdlm" (ancestral
    with caching); AR checkpoints (model.cfg.causal) always decode left to right. stop_fn(generated (B, n))
    -> bool (B,) is called after every finished block (after every token for AR): rows it flags are finished,
    their remaining positions are filled with pad_id and take no further compute (lm-eval's `until` strings).
    cache=False turns off mdlm's prediction caching (a reference: the draws, hence the output, are the same).
    decode ("fixed", "threshold" with `threshold`, "factor" with `factor`): the LLaDA sampler's parallel
    decoding policy; steps is then an upper bound (steps = gen_length: at least one token per step).
    kv_cache ("none", "prefix", "dual") and refresh_every: see the module docstring. generator: one
    torch.Generator, or one per row for batch-invariant sampling.
    objective (model/objectives): the checkpoint's; the mdlm sampler steps its reverse process (its
    schedule's unmask probability; 1 at the last step, so nothing stays masked). None: the linear schedule.
    sampler="remdm" (model/remdm.py) re-masks decoded tokens; `remdm` is its ReMDMConfig (strategy, eta, top_p,
    loop times; default: rescale). `stats`, when given, receives "forward_rows" (sequences pushed through the model), "forwards" (calls)
    and "forward_tokens" (token positions pushed through the model, the cost with a cache)."""
    check_options(sampler, remasking, decode, threshold, factor, kv_cache, refresh_every, gen_length, steps,
                  exact_cache=bool(getattr(objective, "exact_kv_cache", False)))
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    if pad_id == mask_id:
        raise ValueError("pad_id must differ from mask_id: padding would be taken for positions to generate")
    if stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos needs eos_id")
    ids, real = _prepare(model, prompt, prompt_mask, batch_size, pad_id)
    stats = stats if stats is not None else {}
    for key in ("forwards", "forward_rows", "forward_tokens"):
        stats.setdefault(key, 0)
    noise = Noise(generator, ids.shape[0], ids.device)
    if objective is not None and hasattr(objective, "generate"):
        # The objective's own sampler (block diffusion: block by block with its exact cache, kv_cache != "none";
        # its blocks are the objective's, block_length is not used; steps are spread evenly over its blocks).
        if cfg_scale:
            raise ValueError(f"classifier-free guidance is not supported by the {objective.name} sampler")
        per_block = max(1, round(steps * getattr(objective, "block_size", gen_length) / gen_length))
        return objective.generate(model, ids, real, mask_id=mask_id, gen_length=gen_length, steps=per_block,
                                  noise=noise, temperature=temperature, remasking=remasking, sampler=sampler,
                                  decode=decode, threshold=threshold, factor=factor, kv_cache=kv_cache != "none",
                                  eos_id=eos_id, min_new_tokens=min_new_tokens, stop_at_eos=stop_at_eos,
                                  stop_fn=stop_fn, pad_id=pad_id, callback=callback, stats=stats, remdm=remdm)
    if sampler == "psi":
        raise ValueError("sampler 'psi' steps a uniform or hybrid objective (diffusion.objective=uniform|hybrid); "
                         "masked checkpoints use sampler='remdm' for predictor-corrector steps")
    if _is_causal(model):
        if cfg_scale:
            raise ValueError("classifier-free guidance is defined for diffusion models only")
        return _ar_generate(model, ids, real, gen_length=gen_length, temperature=temperature, noise=noise,
                            eos_id=eos_id, min_new_tokens=min_new_tokens, stop_at_eos=stop_at_eos,
                            callback=callback, stats=stats, mask_id=mask_id, stop_fn=stop_fn, pad_id=pad_id,
                            kv_cache=kv_cache != "none")
    block_length = block_length or gen_length
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks {n_blocks} "
                         f"(gen_length / block_length)")
    steps_per_block = steps // n_blocks
    if sampler == "remdm":
        from .remdm import ReMDMConfig, remdm_generate
        return remdm_generate(model, ids, real, cfg=remdm or ReMDMConfig(), mask_id=mask_id, gen_length=gen_length,
                              steps=steps, block_length=block_length, noise=noise, objective=objective,
                              temperature=temperature, cfg_scale=cfg_scale, eos_id=eos_id,
                              min_new_tokens=min_new_tokens, callback=callback, stats=stats)
    B, P = ids.shape
    device = ids.device
    x = torch.cat([ids, torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)], 1)
    if real is not None:
        real = torch.cat([real, torch.ones(B, gen_length, dtype=torch.bool, device=device)], 1)
    kv = None
    if kv_cache != "none":
        key_real = None if real is None or bool(real.all()) else real
        if key_real is not None and cfg_scale:
            key_real = torch.cat([key_real, key_real])
        kv = KVCache(model.cfg.n_layers, B * (2 if cfg_scale else 1), x.shape[1], causal=False, key_real=key_real)
    common = dict(mask_id=mask_id, prompt_len=P, cfg_scale=cfg_scale)
    step_no = 0
    for blk in range(n_blocks):
        start, end = P + blk * block_length, P + (blk + 1) * block_length
        logits_cache = None  # rows' logits for this block; mdlm reuses a row's while its canvas is unchanged
        stale = torch.ones(B, dtype=torch.bool, device=device)
        for s in range(steps_per_block):
            block = x[:, start:end]
            is_mask = block == mask_id
            remaining = is_mask.sum(1)
            if not bool(remaining.any()):
                break  # every row finished this block early (threshold decoding, EOS filling)
            if sampler == "mdlm" and cache:
                need = stale & (remaining > 0)
            else:
                need = remaining > 0
            n_need = int(need.sum())
            # the cache is refreshed at a block's first step (the previous block just completed) and every
            # refresh_every steps; a row's step index within the block is the same whatever the other rows do
            refresh = s == 0 or (refresh_every > 0 and s % refresh_every == 0)
            fwd = dict(cache=kv, refresh=refresh, kv_mode=kv_cache, stats=stats, **common)
            if n_need == B:
                logits_cache = _block_logits(model, x, real, None, start, end, **fwd)
            elif n_need:
                # Only rows that still have work (or, for mdlm, whose canvas changed) go through the model.
                rows = need.nonzero().squeeze(1)
                sub = _block_logits(model, x, real, rows, start, end, **fwd)
                if logits_cache is None:
                    logits_cache = sub.new_zeros(B, end - start, sub.shape[-1])
                logits_cache[rows] = sub
            if n_need:
                stats["forwards"] += 1
                stats["forward_rows"] += n_need * (2 if cfg_scale else 1)
            logits = logits_cache
            x_prev = x.clone() if sampler == "mdlm" else None
            ban_eos(logits, eos_id, start - P, min_new_tokens)
            # Sample and score only the masked positions: the float64 Gumbel noise over (positions, vocab)
            # is the largest tensor of a step for big vocabularies.
            lg = logits[is_mask]  # (N, V)
            u = noise.masked(is_mask, lg.shape[-1]) if temperature > 0 else None
            picked = gumbel_argmax(lg, temperature, u=u)
            pred = block.clone()
            pred[is_mask] = picked
            if sampler == "mdlm":
                t = 1.0 - s / steps_per_block
                t_next = 1.0 - (s + 1) / steps_per_block
                # The objective's reverse step (its schedule); the linear closed form without one.
                p_unmask = objective.unmask_prob(t, t_next) if objective is not None else (t - t_next) / t
                if torch.is_tensor(p_unmask):  # per token value (genmd4): P(v, unmask) = p(v) p_unmask(v)
                    per_pos = torch.zeros(is_mask.shape, dtype=torch.float64, device=device)
                    per_pos[is_mask] = p_unmask.to(device)[picked]
                    p_unmask = per_pos
                take = is_mask & (noise.rows(remaining > 0, is_mask.shape[1]) < p_unmask)
            else:
                conf = confidences(lg, picked, is_mask, remasking, noise)
                take = select(decode, conf, is_mask, steps_per_block - s, threshold=threshold, factor=factor)
            x[:, start:end] = torch.where(take, pred, block)
            if stop_at_eos:
                x[:, P:] = _fill_after_eos(x[:, P:], mask_id, eos_id)
            if x_prev is not None:
                stale = (x != x_prev).any(1)  # the cache stays valid exactly while a row's canvas is unchanged
            step_no += 1
            if callback is not None:
                callback(step_no, x)
        # A block must be complete before the next starts (steps_per_block steps always suffice; EOS filling
        # can only remove masks).
        assert not bool((x[:, start:end] == mask_id).any()), "sampler left masks in a finished block"
        if stop_fn is not None and end < P + gen_length:
            done = stop_fn(x[:, P:end]).to(device)
            tail = x[:, end:]
            x[:, end:] = torch.where(done[:, None] & (tail == mask_id), torch.full_like(tail, pad_id), tail)
    return x


def _ar_generate(model, ids, real, *, gen_length, temperature, noise, eos_id, min_new_tokens, stop_at_eos,
                 callback, stats, mask_id, stop_fn, pad_id, kv_cache: bool) -> torch.Tensor:
    """Left-to-right sampling for causal checkpoints, one token per forward. Without a cache every forward
    runs the whole sequence; with kv_cache the prompt runs once and then each forward runs only the newest
    token against the cached keys/values of the earlier ones (exact: a causal model's earlier keys never
    change).

    Padding is hidden with doc_ids (padding = document 0, text = document 1) rather than key_padding: under
    the causal mask a left-pad query would otherwise see no key at all, and some attention kernels return NaN
    for such rows, which then leaks into real rows through the values. With the cache, decoding queries are
    real tokens and see the real keys before them (model/kvcache.py)."""
    B, P = ids.shape
    if P == 0:
        raise ValueError("an autoregressive model needs at least one prompt token to condition on (e.g. BOS)")
    x = ids
    doc = None if real is None or bool(real.all()) else real.long()
    cache = None
    if kv_cache:
        key_real = None if doc is None else torch.cat([real, torch.ones(B, gen_length, dtype=torch.bool,
                                                                        device=ids.device)], 1)
        cache = KVCache(model.cfg.n_layers, B, P + gen_length, causal=True, key_real=key_real)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for i in range(gen_length):
        if cache is None or i == 0:
            at = torch.zeros_like(x, dtype=torch.bool)
            at[:, -1] = True
            extra = {} if cache is None else {"kv_cache": cache.fill()}
            logits = model(x, doc_ids=doc, logits_at=at, **extra).float()
            stats["forward_tokens"] += B * x.shape[1]
        else:
            logits = model(x[:, -1:], kv_cache=cache.reuse(x.shape[1] - 1))[:, -1].float()
            stats["forward_tokens"] += B
        stats["forwards"] += 1
        stats["forward_rows"] += B
        if mask_id < logits.shape[-1]:
            logits[:, mask_id] = float("-inf")
        if eos_id is not None and i < min_new_tokens:
            logits[:, eos_id] = float("-inf")
        u = noise.masked(torch.ones(B, 1, dtype=torch.bool, device=x.device), logits.shape[-1]) \
            if temperature > 0 else None
        nxt = gumbel_argmax(logits, temperature, u=u)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # finished rows only pad
        if stop_at_eos:
            done |= nxt == eos_id
        x = torch.cat([x, nxt[:, None]], 1)
        if doc is not None:
            doc = torch.cat([doc, torch.ones_like(doc[:, :1])], 1)
        if callback is not None:
            callback(i + 1, x)
        if stop_fn is not None:
            done |= stop_fn(x[:, P:]).to(done.device)
        if bool(done.all()):
            x = torch.cat([x, torch.full((B, gen_length - i - 1), pad_id, dtype=torch.long, device=x.device)], 1)
            break
    return x


def render(tokenizer, ids: Sequence[int], mask_id: int, mask_glyph: str = "░") -> str:
    """Text of a partially unmasked sequence: runs of real tokens decoded together, one glyph per mask."""
    out, run = [], []
    for t in ids:
        t = int(t)
        if t == mask_id:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(mask_glyph)
        else:
            run.append(t)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


def strip_after_eos(ids: Sequence[int], eos_id: Optional[int]) -> list[int]:
    """Generated ids up to (not including) the first EOS."""
    ids = [int(t) for t in ids]
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return ids


def length_batches(lengths: Sequence[int], batch_size: int, max_pad: float = 0.1) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, longest first, where no row is padded by more
    than `max_pad` of its batch's length. On CPU a forward pass is compute-bound, so padding costs as much
    as real tokens: a batch of mixed lengths can be slower than one example at a time."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[i] >= (1.0 - max_pad) * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def row_generators(seeds: Sequence[int], device=None) -> list[torch.Generator]:
    """One generator per request, for batch-invariant sampling."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def generate_many(model, prompts: Sequence[Sequence[int]], *, batch_size: int = 32, max_pad: float = 0.1,
                  seeds: Optional[Sequence[int]] = None, **kw) -> list[list[int]]:
    """Generated ids (gen_length per prompt, input order) for many prompts, in batches of similar length.

    Every row of a batch costs as much compute as its longest one, so one batch of mixed lengths can be
    slower on a CPU than prompts one at a time; grouping rows whose padding is at most `max_pad` of the row
    (prompt + generation) keeps the batching gain. `seeds` (one per prompt) gives every prompt its own
    generator, so its output does not depend on which prompts share its batch. Other keyword arguments go to
    `generate`. A `stop_fn` receives the rows of one batch at a time."""
    G = kw["gen_length"]
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts (one per prompt)")
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    for idx in length_batches([len(p) + G for p in prompts], batch_size, max_pad):
        if seeds is not None:
            kw["generator"] = row_generators([seeds[i] for i in idx], device)
        x = generate(model, [prompts[i] for i in idx], **kw)
        for r, i in enumerate(idx):
            out[i] = x[r, -G:].tolist()
    return out
