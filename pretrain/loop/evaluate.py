"""Validation loss during training: fixed batches with fixed noise, so the numbers compare across steps."""
from __future__ import annotations

import torch

from data import Loader

from ..config import Config
from ..engines.parallel import local_loss, loss_scope
from .metrics import all_reduce_mean
from .step import ce_chunk_for, objective_loss


@torch.no_grad()
def evaluate(model, cfg: Config, source, *, dp_rank: int, dp_size: int, micro: int, device, autocast,
             objective) -> float:
    """Mean loss over train.eval_batches fixed validation batches with fixed noise (comparable across steps)."""
    model.eval()
    objective = objective.for_validation()  # the unbiased bound, whatever surrogate training uses
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    loader = Loader(source, seed=0, dp_rank=dp_rank, dp_size=dp_size)
    n = source.num_samples
    batches = cfg.train.eval_batches if n is None else max(1, min(cfg.train.eval_batches, n // G))
    rows = loader.rank_positions(0, G)
    total = torch.zeros((), device=device)
    for i in range(batches):
        noise = objective.draw(10_007, i, G, L, stratified=True, random_length_prob=0.0)
        for m in range(len(rows) // micro):
            x0, doc = loader.micro_batch(i * G, G, micro, m)
            r = rows[m * micro:(m + 1) * micro]
            with loss_scope(cfg.parallel.tp > 1), autocast:
                batch = objective.noise(x0, noise.rows(r), doc).to(device)
                loss, stats = objective_loss(model, cfg, objective, batch)
                if "nelbo" in stats:  # a surrogate's objective (genmd4's REINFORCE term) reports its bound
                    loss = local_loss(stats["nelbo"])
            total += loss.float() * len(r) / len(rows)
    model.train()
    return float(all_reduce_mean(total / batches))


@torch.no_grad()
def search_variants(model, cfg: Config, source, *, dp_rank: int, dp_size: int, micro: int, device, autocast,
                    objective) -> dict:
    """The objective's training-noise variants (`Objective.variants`: block diffusion's clipped intervals with
    diffusion.block_clip_search) scored on the validation batches with the validation noise, BD3-LM's way
    (`_clipped_schedule_search`): per batch, the variance of the per-unit losses over the global batch (every
    rank's rows), summed over the batches; the objective adopts the least-variance variant. Returns what it
    logs about its choice ({} when it has no variants). One forward per variant per micro-batch."""
    variants = objective.variants()
    if not variants:
        return {}
    model.eval()
    keys = list(variants)
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    loader = Loader(source, seed=0, dp_rank=dp_rank, dp_size=dp_size)
    n = source.num_samples
    batches = cfg.train.eval_batches if n is None else max(1, min(cfg.train.eval_batches, n // G))
    rows = loader.rank_positions(0, G)
    moments = torch.zeros(batches, len(keys), 3, dtype=torch.float64, device=device)  # sum, sum of squares, count
    for i in range(batches):
        noise = objective.draw(10_007, i, G, L, stratified=True, random_length_prob=0.0)  # validation's noise
        for m in range(len(rows) // micro):
            x0, doc = loader.micro_batch(i * G, G, micro, m)
            r = rows[m * micro:(m + 1) * micro]
            for j, key in enumerate(keys):
                with loss_scope(cfg.parallel.tp > 1), autocast:
                    batch = variants[key].noise(x0, noise.rows(r), doc).to(device)
                    u = variants[key].unit_losses(model, batch, ce_chunk=ce_chunk_for(cfg)).double()
                moments[i, j, 0] += u.sum()
                moments[i, j, 1] += (u * u).sum()
                moments[i, j, 2] += u.numel()
    model.train()
    # Summed over data-parallel ranks (the mean over all ranks counts each tp replica of a row once per replica).
    s1, s2, count = (all_reduce_mean(moments) * dp_size).unbind(-1)
    variance = ((s2 - s1 * s1 / count) / (count - 1).clamp_min(1)).sum(0)  # unbiased, per batch; summed
    return objective.adopt(dict(zip(keys, variance.tolist())))
