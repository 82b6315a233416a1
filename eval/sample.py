"""Diffusion sampling (LLaDA): start fully masked, predict every masked position, keep the most confident
predictions and leave the rest masked for the next step; optionally block by block (semi-autoregressive)."""
from __future__ import annotations

from typing import Optional

import torch


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """argmax of logits/temperature + Gumbel noise, in float64 (low precision makes the noise lumpy)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits / temperature + gumbel).argmax(-1)


def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens to unmask at each of `steps` steps: an even split, remainder first. (B,) -> (B, steps)."""
    base = n_masked // steps
    rem = n_masked % steps
    out = base[:, None].repeat(1, steps)
    out += (torch.arange(steps, device=n_masked.device)[None] < rem[:, None]).long()
    return out


@torch.no_grad()
def generate(model, prompt: Optional[torch.Tensor], *, mask_id: int, gen_length: int, steps: int,
             block_length: Optional[int] = None, temperature: float = 0.0, remasking: str = "low_confidence",
             generator: Optional[torch.Generator] = None, batch_size: int = 1) -> torch.Tensor:
    """prompt: (B, P) token ids or None. Returns (B, P + gen_length) with no mask token left."""
    device = next(model.parameters()).device
    if prompt is None:
        prompt = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    B, P = prompt.shape
    block_length = block_length or gen_length
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks {n_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}; choices: low_confidence, random")
    steps_per_block = steps // n_blocks
    x = torch.cat([prompt.to(device), torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)], 1)
    for blk in range(n_blocks):
        start, end = P + blk * block_length, P + (blk + 1) * block_length
        plan = transfer_schedule((x[:, start:end] == mask_id).sum(1), steps_per_block)
        for s in range(steps_per_block):
            is_mask = x == mask_id
            logits = model(x).float()
            logits[..., mask_id] = float("-inf")  # never predict the mask itself
            pred = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                conf = torch.softmax(logits, -1).gather(-1, pred[..., None]).squeeze(-1)
            else:
                conf = torch.rand(x.shape, generator=generator, device=device)
            conf[:, end:] = float("-inf")  # later blocks wait their turn
            conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
            for b in range(B):
                k = int(plan[b, s])
                if k:
                    idx = conf[b].topk(k).indices
                    x[b, idx] = pred[b, idx]
    return x
