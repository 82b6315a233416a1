"""Block diffusion (BD3-LM, Arriola et al., ICLR 2025): autoregressive over blocks, masked diffusion within each.

The sequence is cut into blocks of `diffusion.block_size` tokens. The likelihood factorises over blocks,
p(x) = prod_b p(x^b | x^{<b}), and each factor gets the masked-diffusion bound of its block given the clean
preceding blocks:

    NELBO(x) = sum_b E_{t_b} E_{x_t^b ~ q(. | x^b, t_b)} [ w(t_b) sum_{l in b, masked} -log p(x_l | x_t^b, x^{<b}) ]

with one noise level per block, t_b = t_min + (t_max - t_min) u_b, mask probability 1 - alpha(t_b) and weight
w = -alpha'/(1 - alpha) (1/t for the linear schedule, which is BD3-LM's). Block size L is masked diffusion
(one block, no prefix); block size 1 is the autoregressive chain rule: a one-token block is integrated over
t exactly (always masked, weight 1), so the loss and the bound are the AR negative log-likelihood of the
network read as a next-token model, with no Monte Carlo noise.

Training is vectorised the BD3-LM way: one forward over the 2L input [x_t, x_0], both halves at rotary
positions 0..L-1, under the mask (q and kv index the 2L input, blk = block of the position within its half)

    x_t -> x_t : same block                  (block diagonal)
    x_t -> x_0 : strictly earlier block       (offset block causal)
    x_0 -> x_0 : same or earlier block        (block causal)
    x_0 -> x_t : never

ANDed with the document mask of packed data (and key padding at evaluation). Every noisy token then sees
exactly what its block's own forward [x_0^{<b}, x_t^b] would show it, so one pass gives every block's loss,
with logits only for the noisy half. The mask is built once per batch (an AttentionBatch shared by every
layer and every activation-checkpoint recompute): on CUDA a FlexAttention BlockMask with an explicit
BLOCK_SIZE from the process's one compiled create_block_mask (model.attention.make_block_mask; its mask_mod
reads the block structure from per-position tables, so a random length reuses the compiled graph),
elsewhere (and when 2L fits one tile) the equivalent dense mask through SDPA, made additive in the compute
dtype once per forward.

Noise: the step's draw is a pure function of (seed, step) over the global batch; the per-block u are
stratified over batch x blocks (one draw of G * n_blocks), so a one-block draw is exactly masked diffusion's.
BD3-LM's clipped interval [t_min, t_max] is an option: fixed (`block_t_min`, `block_t_max`), or searched at
every validation (`block_clip_search`: the candidate of least per-block loss variance is adopted, see
`variants` and pretrain/loop/evaluate.py search_variants); the weight stays w(t) (BD3-LM drops 1/t whenever
t_min > 0.5; we never do), and the bound that validation logs and evaluation reports always uses (eps, 1).
`block_keep_first` is the bd3lms protocol: position 0 (BOS) is never masked and never scored.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..attention import FLEX_BLOCK, AttentionBatch, flex_available, make_block_mask, prefix_mask, sparse_tiles
from .base import EvalDraw, Noised, Objective, StepNoise, pad, register, sample_u, step_generator
from .mdm import MaskedDiffusion, autocast_for, eval_generator, subset_nelbo
from .schedules import get_schedule

_TAG_BLOCK_T, _TAG_BLOCK_COUNT, _TAG_BLOCK_POS = 11, 12, 13  # evaluation noise streams (mdm uses 1..4)


# --------------------------------------------------------------------------------------------- the masks
def allowed(q_clean, kv_clean, q_block, kv_block):
    """The 2L training mask from each side's half (clean: in x_0) and block index within its half."""
    diagonal = ~q_clean & ~kv_clean & (q_block == kv_block)
    offset = ~q_clean & kv_clean & (kv_block < q_block)
    causal = q_clean & kv_clean & (kv_block <= q_block)
    return diagonal | offset | causal


def position_tables(L: int, block_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, block) of every position of the 2L input: whether it is in the clean half, and its block index
    within its half."""
    pos = torch.arange(2 * L, device=device)
    clean = pos >= L
    return clean, torch.where(clean, pos - L, pos) // block_size


def pair_allowed(q: torch.Tensor, kv: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """The 2L training mask as a function of query and key indices (broadcasting integer tensors): True where
    q may attend kv."""
    q_clean, kv_clean = q >= L, kv >= L
    return allowed(q_clean, kv_clean, torch.where(q_clean, q - L, q) // block_size,
                   torch.where(kv_clean, kv - L, kv) // block_size)


def training_mask(L: int, block_size: int, doc_ids: Optional[torch.Tensor] = None,
                  key_padding: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Dense bool (B or 1, 1, 2L, 2L) mask of the 2L input, document and padding masks included (the forward
    makes it additive in its compute dtype once: AttentionBatch.for_dtype)."""
    device = device if device is not None else (doc_ids.device if doc_ids is not None else None)
    clean, blk = position_tables(L, block_size, device)
    mask = allowed(clean[:, None], clean[None, :], blk[:, None], blk[None, :])[None, None]
    if doc_ids is not None:
        d = torch.cat([doc_ids, doc_ids], 1)
        mask = mask & (d[:, :, None] == d[:, None, :])[:, None]
    if key_padding is not None:
        kp = torch.cat([key_padding, key_padding], 1).bool()
        mask = mask & kp[:, None, None, :]
    return mask


def flex_training_mask(L: int, block_size: int, doc_ids=None, key_padding=None, device=None):
    """The 2L training mask as a FlexAttention BlockMask with tiles of FLEX_BLOCK x FLEX_BLOCK given explicitly
    (bd3lms issue 23); 2L need not be a multiple of the tile. Built by model.attention.make_block_mask: the
    process's one compiled create_block_mask on CUDA. mask_mod reads the block structure from per-position
    tables (never from L or the block size as Python numbers), so a new length reuses the compiled graph."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    clean, blk = position_tables(L, block_size, device)
    d = torch.cat([doc_ids, doc_ids], 1) if doc_ids is not None else None
    keep = torch.cat([key_padding, key_padding], 1).bool() if key_padding is not None else None
    B = d.shape[0] if d is not None else (keep.shape[0] if keep is not None else None)
    if d is None and keep is None:
        def mask_mod(b, h, q, kv):
            return allowed(clean[q], clean[kv], blk[q], blk[kv])
    elif keep is None:
        def mask_mod(b, h, q, kv):
            return allowed(clean[q], clean[kv], blk[q], blk[kv]) & (d[b, q] == d[b, kv])
    elif d is None:
        def mask_mod(b, h, q, kv):
            return allowed(clean[q], clean[kv], blk[q], blk[kv]) & keep[b, kv]
    else:
        def mask_mod(b, h, q, kv):
            return allowed(clean[q], clean[kv], blk[q], blk[kv]) & (d[b, q] == d[b, kv]) & keep[b, kv]
    return make_block_mask(mask_mod, B, 2 * L, device, positional=((clean, 0), (blk, 0), (d, 1), (keep, 1)))


TILE_ROWS = 128  # query rows per SDPA call off flex: at 2L = 512, 64-128 cut attention time ~35%, 32 is slower


def training_attention(L: int, block_size: int, *, doc_ids=None, key_padding=None, device, backend="auto"
                       ) -> AttentionBatch:
    """The 2L mask, built once per batch and shared by every layer and recompute: flex on CUDA (backend auto or
    flex; one tile or less takes the dense mask, as model.attention does), otherwise SDPA with the dense mask
    cut into query tiles of TILE_ROWS rows over the keys each tile may see (model.attention.sparse_tiles: a
    noisy tile needs only the clean blocks before it and its own noisy blocks, a clean tile the clean blocks up
    to its own). The tiles come from the block structure alone, so they are the same every step."""
    device = torch.device(device)
    if key_padding is not None and bool(key_padding.all()):
        key_padding = None
    if backend in ("auto", "flex", "flash") and device.type == "cuda" and flex_available(device) \
            and 2 * L > FLEX_BLOCK:
        return AttentionBatch("flex", False, block_mask=flex_training_mask(L, block_size, doc_ids, key_padding,
                                                                           device))
    mask = training_mask(L, block_size, doc_ids, key_padding, device)
    if 2 * L <= 2 * TILE_ROWS:
        return AttentionBatch("sdpa", False, mask=mask)
    return AttentionBatch("sdpa", False, tiles=sparse_tiles(mask, training_mask(L, block_size, device=device)[0, 0],
                                                            TILE_ROWS))


def two_l_forward(model, xt, x0, at, block_size: int, *, doc_ids=None, key_padding=None, **kw):
    """One vectorised forward of [x_t, x_0]: logits (or cross-entropies with `targets=`) at the positions `at`
    of the noisy half: a (B, L) bool mask, or (N,) flat row-major positions of the (B, L) batch (computed on
    the host by Noised.to: no device sync), mapped here to the (B, 2L) input."""
    B, L = x0.shape
    backend = getattr(getattr(model, "cfg", None), "attn_backend", "auto")
    attn = training_attention(L, block_size, doc_ids=doc_ids, key_padding=key_padding, device=x0.device,
                              backend=backend)
    positions = torch.arange(L, device=x0.device).repeat(2)
    at2 = torch.cat([at, torch.zeros_like(at)], 1) if at.dtype == torch.bool else at + (at // L) * L
    return model(torch.cat([xt, x0], 1), attn=attn, positions=positions, logits_at=at2, **kw)


def per_block_logits(model, xt, x0, block_size: int, *, doc_ids=None, key_padding=None) -> torch.Tensor:
    """The reference: one forward per block b over [x_0^{<b}, x_t^b] (block-causal), logits (B, L, V) of every
    noisy position. What the vectorised forward must reproduce, and what generation computes."""
    B, L = x0.shape
    out = []
    for start in range(0, L, block_size):
        end = min(L, start + block_size)
        inp = torch.cat([x0[:, :start], xt[:, start:end]], 1)
        mask = prefix_mask(end, block_size, None if key_padding is None else key_padding[:, :end],
                           None if doc_ids is None else doc_ids[:, :end], device=x0.device)
        logits = model(inp, attn=AttentionBatch("sdpa", False, mask=mask))
        out.append(logits[:, start:end])
    return torch.cat(out, 1)


# ------------------------------------------------------------------------------------- the noise interval
def clip_search(variances: dict) -> tuple:
    """BD3-LM's data-driven interval (`_clipped_schedule_search`): given {(t_min, t_max): variance of the
    per-block losses under that interval}, the interval of least variance; ties go to the wider interval. A
    pure function: the trainer (pretrain/loop/evaluate.py `search_variants`) measures the variances."""
    if not variances:
        raise ValueError("no candidate interval to choose from")
    return min(variances, key=lambda k: (float(variances[k]), -(k[1] - k[0])))


def clip_candidates(widths=(0.5, 0.6, 0.7, 0.8, 0.9), delta: float = 0.05, eps: float = 1e-3) -> list:
    """BD3-LM's search grid: every interval of the given widths starting at multiples of delta, plus (eps, 1)."""
    out = [(eps, 1.0)]
    for w in widths:
        for i in range(int(round((1.0 - w) / delta)) + 1):
            lo = round(i * delta, 10)
            out.append((max(lo, eps), round(lo + w, 10)))
    return out


# ------------------------------------------------------------------------------------------ the objective
@register
class BlockDiffusion(Objective):
    """block: BD3-LM. Bidirectional network, custom 2L mask, one noise level per block."""
    name = "block"
    title = "block diffusion"
    eval_methods = ("count", "t")
    input_multiplier = 2  # the network sees 2L tokens per training sequence (launch.plan, MFU)
    exact_kv_cache = True  # generation caches finished clean blocks only (any sampler, ReMDM included)
    summary = "AR over blocks, masked diffusion within; 2L input [x_t, x_0] under a block mask; exact KV cache"

    def conditional_refusal(self) -> Optional[str]:
        """None: eval/likelihood.py routes a block objective to the block bound with only the answer scored
        (plain masked-answer scoring would let the clean context see the masked answer)."""
        return None

    def __init__(self, dcfg, *, mask_id=None, vocab_size=None):
        super().__init__(dcfg, mask_id=mask_id, vocab_size=vocab_size)
        bs = int(getattr(dcfg, "block_size", 0))
        if bs < 1:
            raise ValueError("diffusion.objective=block needs diffusion.block_size >= 1 (tokens per block; it must "
                             "divide data.seq_len: 1 is AR, seq_len is masked diffusion, BD3-LM uses 4 to 16)")
        self.block_size = bs
        self.schedule = get_schedule(dcfg.schedule, dcfg.poly_exponent)
        self.eps = dcfg.eps
        self.t_min = dcfg.block_t_min if dcfg.block_t_min > 0 else dcfg.eps
        self.t_max = dcfg.block_t_max
        if not 0 < self.t_min < self.t_max <= 1:
            raise ValueError(f"diffusion.block_t_min={dcfg.block_t_min} / block_t_max={dcfg.block_t_max}: need "
                             f"0 < t_min < t_max <= 1 (0 for t_min means diffusion.eps)")
        self.keep_first = bool(dcfg.block_keep_first)
        self.search = bool(getattr(dcfg, "block_clip_search", False))
        self.widths = tuple(float(w) for w in getattr(dcfg, "block_clip_widths", (0.5, 0.6, 0.7, 0.8, 0.9)))
        self.delta = float(getattr(dcfg, "block_clip_delta", 0.05))
        if self.search:
            if bs == 1:
                raise ValueError("diffusion.block_clip_search=true with diffusion.block_size=1: a one-token block "
                                 "has no noise interval to search (its loss is the exact AR likelihood); set "
                                 "block_clip_search=false")
            if not self.widths or not all(0 < w <= 1 for w in self.widths) or not 0 < self.delta < 1:
                raise ValueError(f"diffusion.block_clip_widths={list(self.widths)} / block_clip_delta={self.delta}: "
                                 f"need widths in (0, 1] and 0 < delta < 1 (BD3-LM: 0.5..0.9 and 0.05)")

    # -- checks
    def check_model(self, mcfg) -> None:
        super().check_model(mcfg)
        if getattr(mcfg, "time_conditioning", "none") != "none":
            raise ValueError("diffusion.objective=block has one noise level per block, not per row: set "
                             "model.time_conditioning=none (BD3-LM is not time-conditioned)")

    def with_interval(self, t_min: float, t_max: float) -> "BlockDiffusion":
        """The same objective training on the noise interval [t_min, t_max] (itself if it already does)."""
        if (self.t_min, self.t_max) == (t_min, t_max):
            return self
        import copy
        other = copy.copy(self)
        other.t_min, other.t_max = t_min, t_max
        return other

    def for_validation(self) -> "BlockDiffusion":
        """The same objective with the unbiased interval (eps, 1): what validation logs as the bound."""
        return self.with_interval(self.eps, 1.0)

    # -- the clipped interval, searched at validation (BD3-LM's var_min; base.Objective.variants)
    def variants(self) -> dict:
        """With block_clip_search: BD3-LM's candidate intervals (and (eps, 1)), each as an objective."""
        if not self.search:
            return {}
        return {c: self.with_interval(*c) for c in clip_candidates(self.widths, self.delta, self.eps)}

    def unit_losses(self, model, batch: Noised, *, ce_chunk: int = 0) -> torch.Tensor:
        """(B, n_blocks): each block's mean per-token weighted loss (unmasked tokens count 0), as BD3-LM
        collects them for its variance search."""
        B, L = batch.x0.shape
        ce = self._block_ce(model, batch, ce_chunk)
        ce = ce.full_tensor() if hasattr(ce, "full_tensor") else ce  # loss-parallel (TP): replicated
        per = torch.zeros(B, L, dtype=torch.float32, device=batch.x0.device)
        per[batch.at] = (ce * batch.weights).float()
        return per.view(B, L // self.block_size, self.block_size).mean(-1)

    def adopt(self, variances: dict) -> dict:
        """Train on the least-variance interval from now on (the weight stays w(t); the bound stays (eps, 1))."""
        self.t_min, self.t_max = clip_search(variances)
        return {"block_t_min": self.t_min, "block_t_max": self.t_max, "clip_variance": float(variances[(
            self.t_min, self.t_max)]), "clip_variance_unclipped": float(variances.get((self.eps, 1.0), math.nan))}

    def state(self) -> dict:
        """The adopted interval (only when searched: a fixed interval comes from the config)."""
        return {"block_t_min": self.t_min, "block_t_max": self.t_max} if self.search else {}

    def load_state(self, state: dict) -> None:
        if self.search and state:
            self.t_min, self.t_max = float(state["block_t_min"]), float(state["block_t_max"])

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len % self.block_size:
            raise ValueError(f"diffusion.block_size={self.block_size} must divide data.seq_len={seq_len}: pick a "
                             f"block size among the divisors of {seq_len}")

    # -- noising and the training loss
    def draw(self, seed, step, global_batch, seq_len, *, stratified=True, random_length_prob=0.0) -> StepNoise:
        """u (G, n_blocks) stratified over G * n_blocks, then the per-position uniforms and the length coin, in
        that order from one (seed, step) generator: with one block the draw is masked diffusion's, bit for bit.
        A random length is rounded down to whole blocks."""
        self.check_seq_len(seq_len)
        nb = seq_len // self.block_size
        gen = step_generator(seed, step)
        u = sample_u(global_batch * nb, gen, stratified).view(global_batch, nb)
        mask_uniform = torch.rand(global_batch, seq_len, generator=gen)
        coin, frac = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        length = seq_len
        if coin < random_length_prob:
            length = self.block_size * max(1, (1 + int(frac * seq_len)) // self.block_size)
        return StepNoise(u, mask_uniform, length)

    def block_t(self, u: torch.Tensor) -> torch.Tensor:
        """Noise levels of the training interval: t = t_min + (t_max - t_min) u."""
        return self.t_min + (self.t_max - self.t_min) * u

    def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
        B, L = x0.shape
        self.check_seq_len(L)
        bs = self.block_size
        u = noise.u.view(B, -1)[:, :L // bs].to(x0.device)
        if bs == 1:  # t integrated out exactly: always masked, weight 1 (the AR chain rule, no noise)
            masked = torch.ones(B, L, dtype=torch.bool, device=x0.device)
            w = torch.ones(B, L, device=x0.device)
        else:
            t = self.block_t(u).repeat_interleave(bs, 1)  # (B, L)
            masked = noise.mask_uniform.to(x0.device) < self.schedule.mask_prob(t)
            w = self.schedule.weight(t)
        if self.keep_first:
            masked[:, 0] = False
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        return Noised(x0=x0, xt=xt, at=masked, targets=x0[masked], weights=w[masked].float(), doc_ids=doc_ids)

    def scored(self, L: int) -> int:
        return L - 1 if self.keep_first else L

    def _block_ce(self, model, batch: Noised, ce_chunk: int) -> torch.Tensor:
        """Cross-entropies at the masked positions of the noisy half, from one 2L forward."""
        return two_l_forward(model, batch.xt, batch.x0, batch.selected(), self.block_size, doc_ids=batch.doc_ids,
                             targets=batch.targets, ce_chunk=ce_chunk)

    def loss(self, model, batch: Noised, *, ce_chunk: int = 0):
        B, L = batch.x0.shape
        ce = self._block_ce(model, batch, ce_chunk)
        loss = (ce * batch.weights).sum() / (B * self.scored(L))
        return loss, {"masked_frac": batch.at.float().mean().detach(),
                      "ce_masked": ce.detach().mean() if ce.numel() else torch.zeros((), device=batch.x0.device)}

    def logit_fraction(self, seq_len: int, points: int = 100_000) -> float:
        """Expected masked fraction of the L noisy positions (the clean half never gets logits)."""
        if self.block_size == 1:
            return 1.0
        u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
        return float(self.schedule.mask_prob(self.block_t(u)).mean())

    # -- the bound
    def eval_draw(self, method, *, seed, seq, sample, samples, maskable, eps, group) -> EvalDraw:
        """Per block b with n_b maskable positions: "count" masks l_b of them (l_b stratified over the K
        samples, uniform on {1..n_b}) with weight n_b / l_b; "t" masks each with probability t_b (t_b stratified
        over the K samples, in (eps, 1)) with weight w(t_b). Blocks draw independently. Block size 1 is exact:
        every maskable position masked, weight 1. noise: (masked (L,), per-position weights (L,) float64)."""
        if method not in self.eval_methods:
            raise ValueError(f"unknown estimator {method!r} for block diffusion; choices: count, t")
        L = maskable.numel()
        masked = torch.zeros(L, dtype=torch.bool)
        weights = torch.zeros(L, dtype=torch.float64)
        if self.block_size == 1:
            return EvalDraw((maskable.clone(), maskable.double()), 1.0)
        pos = torch.rand(L, generator=eval_generator(seed, _TAG_BLOCK_POS, seq, sample), dtype=torch.float64)
        for j, start in enumerate(range(0, L, self.block_size)):
            sl = slice(start, min(L, start + self.block_size))
            m = maskable[sl]
            n = int(m.sum())
            if n == 0:
                continue
            if method == "count":
                v0 = torch.rand(1, generator=eval_generator(seed, _TAG_BLOCK_COUNT, seq, j), dtype=torch.float64)
                l = min(n, 1 + int(((float(v0) + sample / samples) % 1.0) * n))
                score = pos[sl].masked_fill(~m, 2.0)
                blk = torch.zeros(m.numel(), dtype=torch.bool)
                blk[score.argsort()[:l]] = True
                masked[sl], weights[sl] = blk, n / l
            else:
                u0 = torch.rand(1, generator=eval_generator(seed, _TAG_BLOCK_T, seq, j), dtype=torch.float64)
                t = (1.0 - eps) * (1.0 - ((float(u0) + sample / samples) % 1.0)) + eps
                tt = torch.tensor([t], dtype=torch.float64)
                masked[sl] = (pos[sl] < self.schedule.mask_prob(tt)) & m
                weights[sl] = float(self.schedule.weight(tt))
        return EvalDraw((masked, weights * masked), 1.0)

    @torch.no_grad()
    def eval_sums(self, model, x0, draws, *, keep, subs=True):
        L = x0.shape[1]
        masked, _ = pad([d.noise[0] for d in draws], False, x0.device, length=L)
        w, _ = pad([d.noise[1] for d in draws], 0.0, x0.device, length=L)
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        with autocast_for(x0.device):
            logits = two_l_forward(model, xt, x0, masked, self.block_size, key_padding=keep)
        logits = logits.float()
        if subs and self.mask_id < logits.shape[-1]:
            logits[:, self.mask_id] = float("-inf")
        ce = F.cross_entropy(logits, x0[masked], reduction="none").double() * w[masked]
        rows = masked.nonzero()[:, 0]
        sums = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device).index_add_(0, rows, ce)
        return sums.cpu() * torch.tensor([d.weight for d in draws], dtype=torch.float64)

    def exact_nelbo(self, cond_logprobs, x0) -> float:
        """sum over blocks of the block's masked-diffusion NELBO given its clean prefix, by enumerating every
        subset of the block. Here cond_logprobs(xt (e,)) receives the input [x_0^{<b}, x_t^b] (e = end of block
        b) and returns (e, V) log-probabilities."""
        L = x0.numel()
        first = 1 if self.keep_first else 0
        total = 0.0
        for start in range(0, L, self.block_size):
            end = min(L, start + self.block_size)
            cand = [i for i in range(start, end) if i >= first]
            costs = {}
            for r in range(1, len(cand) + 1):
                for S in itertools.combinations(cand, r):
                    xt = x0[:end].clone()
                    xt[list(S)] = self.mask_id
                    logp = cond_logprobs(xt)
                    costs[S] = float(sum(-logp[i, x0[i]] for i in S))
            if cand:
                total += subset_nelbo(costs, len(cand))
        return total

    # -- generation
    def unmask_prob(self, t: float, s: float) -> float:
        return self.schedule.unmask_prob(t, s)

    def reverse_step(self, p_x0, z_t, t, s):
        """Within the current block: masked diffusion's absorbing posterior."""
        return MaskedDiffusion.reverse_step(self, p_x0, z_t, t, s)

    def generate(self, model, ids, real, **kw):
        """Block-by-block generation with the exact KV cache (model/block_sample.py)."""
        from ..block_sample import block_generate
        return block_generate(model, ids, real, objective=self, **kw)
