"""Per-GPU memory plan of a parallel layout, checked on a laptop.

    python -m launch.plan --model llada-8b --nodes 8 --gpus-per-node 8 --tp 2 --seq-len 4096 \
        --global-batch 1280 --micro-batch 1 --ac full

Exact parts (parameters, gradients, AdamW state): the model is built on the meta device, and the real
parallelization of pretrain/engines/parallel.py (TP+SP plan, FSDP2) is applied under the real mesh on a *fake*
process group of the full world size, so every number is read off the actual sharded DTensors of rank 0
(the rank with the largest shards: uneven dimensions give their remainder to the first ranks).

Estimated parts: FSDP's transient gathered parameters and unreduced gradients (and, with gradient
accumulation, the unsharded fp32 gradients kept until the last micro-batch reduces them), activations (per
formula below, for every activation-checkpointing mode), the attention masks of the chosen backend and the
chunked cross-entropy's logits. Allocator fragmentation, the CUDA context and communication buffers are not
counted: keep a margin of several GB.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from typing import Optional

GiB = 1024 ** 3


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int = 1
    dp_replicate: int = 1

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def sharded_state_bytes(mcfg, layout: Layout) -> dict:
    """Exact bytes rank 0 holds for parameters, gradients and AdamW state (fp32 master weights), read from the
    real parallelization on the meta device under a fake process group of the full world size."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model import Transformer
    from pretrain.config import ParallelConfig
    from pretrain.engines.parallel import ParallelDims, build_mesh, parallelize

    pcfg = ParallelConfig(dp_replicate=layout.dp_replicate, tp=layout.tp)
    dims = ParallelDims.from_config(pcfg, layout.world)
    dims.validate_model(mcfg)
    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=layout.world)
    try:
        mesh = build_mesh(dims, torch.device("cpu"))
        with torch.device("meta"):
            model = Transformer(mcfg)
        units = _fsdp_units(model, dims.tp)
        model = parallelize(model, pcfg, dims, mesh)
        local = [(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters()]
        n_local = sum(t.numel() for t in local)
        n_tensors = len(local)
    finally:
        if own_pg:
            dist.destroy_process_group()
    fp32 = 4
    return {
        "dims": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp, "dp": dims.dp},
        "local_param_elements": n_local,
        "params": n_local * fp32,  # sharded fp32 master weights
        "grads": n_local * fp32,  # reduce-scattered fp32 gradients, same sharding
        # AdamW: exp_avg and exp_avg_sq per element, plus one fp32 `step` scalar per parameter tensor
        "optimizer": 2 * n_local * fp32 + n_tensors * fp32,
        "largest_unit_elements": max(units),
        "head_unit_elements": units[-1],
        "unsharded_elements": sum(units),
    }


def _fsdp_units(model, tp: int) -> list[int]:
    """Elements each FSDP unit gathers on one rank (pretrain/engines/parallel.apply_fsdp: the embedding, each block,
    [final norm + head]): tensor-parallel weights stay sliced by tp, norm gains are whole. The last entry is
    the head unit, which stays gathered from its forward to its backward. Time conditioning's parameters are
    replicated across tp ranks (whole): each block's modulation is in its block's unit, and the time embedding
    and the final norm's modulation (the root unit, also gathered from forward to backward) count with the head."""
    from model.transformer import is_conditioning

    def per_rank(module, replicated: bool = False):
        return sum(p.numel() if replicated or p.ndim != 2 or is_conditioning(name) else p.numel() // tp
                   for name, p in module.named_parameters())
    root = [m for m in (getattr(model, "time_embed", None), getattr(model, "final_modulation", None)) if m is not None]
    head = sum(per_rank(m) for m in (model.norm, model.output)) + sum(per_rank(m, replicated=True) for m in root)
    return [per_rank(model.tok_embeddings)] + [per_rank(b) for b in model.layers] + [head]


def activation_bytes(mcfg, *, seq_len: int, micro: int, tp: int, ac: str, ac_every: int, ce_chunk: int = 4096,
                     attn_mask: str = "flex", row_loss_bytes: int = 0, input_multiplier: int = 1) -> dict:
    """Estimated activation memory of one micro-batch on one rank (bf16 activations, sequence parallel).

    Saved for backward per token per block, in elements (d = dim, k = kv dim, F = ffn hidden, t = tp):
      2d           the two gathered norm outputs feeding the column-parallel projections (full on every rank)
      (d + d + 2k) / t   attention-norm input; q, k, v
      (d + d) / t        attention output (SDPA) and its reshaped copy feeding wo
      d / t              FFN-norm input
      4F / t             w1 and w3 outputs, silu(w1), their product
    in bf16, plus (d + k) / t pre-RoPE q and k kept in fp32 (the rotation runs in fp32).
    Full checkpointing keeps only each block's input (d / t per token) and recomputes one block at a time.
    Op-level checkpointing keeps the block input and the matmul/attention outputs, (d + (d + 2k) + d + d +
    2F + d) / t in bf16, and recomputes norms, RoPE and SwiGLU's activation.
    The head (worst case: every position masked) keeps the gathered hidden state; the logits exist for one
    chunk of `ce_chunk` rows at a time (bf16 slice, fp32 copy, fp32 log-softmax: 10 bytes per vocab entry /
    t); under tensor parallelism the cross-entropy is loss-parallel and unchunked (every row, V / t).
    Attention masks, once per micro-batch: a dense (B, 1, L, L) additive bf16 mask, built once and shared by
    every layer ("dense", 2 bytes per entry: model/attention.py); a FlexAttention block mask ("flex", int32
    block indices for 128 x 128 tiles, forward and backward); flash-attn varlen index ("varlen", 8 bytes per
    token); or nothing.
    Time conditioning (adaLN) keeps, per block, the two norm outputs before modulation and the two branch
    outputs before their gates, 4d / t more (op-level checkpointing recomputes the first and saves the second
    anyway), and the final norm's output before its modulation (d per token, with the head).
    Full-vocabulary losses at every position (uniform / hybrid: the objective's `row_loss_bytes` > 0) run the
    chunked row loss even under tensor parallelism, each chunk gathered to the full vocabulary: ce_chunk rows of
    row_loss_bytes per vocab entry (its temporaries), not divided by t.
    input_multiplier m: the network sees m x seq_len tokens per sequence (block diffusion's [x_t, x_0], m = 2):
    the blocks and the attention mask are counted at m L, the head at the L training positions only."""
    d, k, F, t = mcfg.dim, mcfg.kv_heads * mcfg.head_dim, mcfg.ffn_dim, tp
    head_tokens = seq_len * micro
    seq_len = seq_len * input_multiplier
    tokens = seq_len * micro
    bf16, fp32 = 2, 4
    per_token_block = bf16 * (2 * d + (2 * d + 2 * k + 2 * d + d + 4 * F) / t) + fp32 * (d + k) / t
    if mcfg.n_kv_heads and mcfg.kv_heads != mcfg.n_heads:  # grouped KV: repeated k, v copies for SDPA
        per_token_block += bf16 * 2 * d / t
    conditioned = getattr(mcfg, "time_conditioning", "none") != "none"
    if conditioned:
        per_token_block += bf16 * 4 * d / t
    block_full = per_token_block * tokens
    block_input = bf16 * d / t * tokens
    n = mcfg.n_layers
    if ac == "op":
        block_op = bf16 * (d + (d + 2 * k) + d + d + 2 * F + d) / t * tokens
        blocks = n * block_op + block_full  # plus one block's recompute at a time
    else:
        if ac == "full":
            checkpointed = n
        elif ac == "selective":
            checkpointed = n // max(1, ac_every)
        else:
            checkpointed = 0
        blocks = (n - checkpointed) * block_full + checkpointed * block_input + (block_full if checkpointed else 0)
    if row_loss_bytes:
        rows = head_tokens if ce_chunk <= 0 else min(head_tokens, ce_chunk)
        logits = rows * row_loss_bytes * mcfg.vocab_size
    else:
        rows = head_tokens if (tp > 1 or ce_chunk <= 0) else min(head_tokens, ce_chunk)
        logits = rows * 10 * mcfg.vocab_size / t
    head = head_tokens * bf16 * d * (2 if conditioned else 1) + logits
    tiles = -(-seq_len // 128)
    masks = {"dense": 2 * micro * seq_len * seq_len, "flex": 2 * 2 * 4 * micro * tiles * tiles,
             "varlen": 8 * tokens, "none": 0}[attn_mask]
    return {"blocks": blocks, "head": head, "attn_masks": masks, "total": blocks + head + masks,
            "per_block_no_ac": block_full}


AC_MODES = ("none", "selective", "op", "full")


def plan(mcfg, layout: Layout, *, seq_len: int, global_batch: int, micro: int, ac: str, ac_every: int,
         param_dtype_bytes: int = 2, gpu_gib: float = 80.0, ce_chunk: int = 4096, attn_mask: str = "flex",
         reduce_every_micro_batch: bool = False, objective: str = "mdm", diffusion=None) -> dict:
    """`diffusion`: the run's diffusion section, when known (a --config): the objective as configured (d3pm's
    uniform graph keeps more per logit than its absorbing one); else the objective's class (its worst case)."""
    from model.objectives import OBJECTIVES, DiffusionConfig, build_objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown --objective {objective!r}; choices: {', '.join(OBJECTIVES)}")
    obj = OBJECTIVES[objective]
    if diffusion is not None and diffusion.objective == objective:
        known = mcfg.mask_id is not None  # else the data names it later: no mask check here
        obj = build_objective(diffusion, mask_id=mcfg.mask_id, vocab_size=mcfg.vocab_size if known else None)
    if obj.time_conditioning and getattr(mcfg, "time_conditioning", "none") == "none":
        mcfg = replace(mcfg, time_conditioning="adaln")  # as the trainer requires (and launch.sweep sets)
    row_loss_bytes = getattr(obj, "row_loss_bytes", 0)
    input_multiplier = getattr(obj, "input_multiplier", 1)  # block: the 2L input
    passes = obj.forward_passes  # genmd4: a pass per mask
    if not isinstance(passes, int):  # an instance property (no --config): the objective's default config
        passes = build_objective(DiffusionConfig(objective=objective), mask_id=None, vocab_size=None).forward_passes
    if row_loss_bytes and hasattr(obj, "chunk"):  # uniform/hybrid: diffusion.row_chunk rows (default) if smaller
        ce_chunk = min(ce_chunk, DiffusionConfig().row_chunk) if ce_chunk > 0 else DiffusionConfig().row_chunk
    exact = sharded_state_bytes(mcfg, layout)
    dp = exact["dims"]["dp"]
    if global_batch % (micro * dp):
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --micro-batch {micro} x data-parallel "
                         f"degree {dp}")
    accum = global_batch // (micro * dp)
    unit = exact["largest_unit_elements"]
    # Two gathered units at a time (the running one and the prefetched next) plus the head unit, gathered from
    # its forward to its backward, in the compute dtype, and one unit's unreduced fp32 gradient before its
    # reduce-scatter. Skipped when nothing is sharded (dp == 1).
    fsdp = ((2 * unit + exact["head_unit_elements"]) * param_dtype_bytes + unit * 4) if dp > 1 else 0
    # Gradient accumulation reduces only after the last micro-batch: until then every rank holds the
    # unsharded fp32 gradients (parallel.reduce_every_micro_batch=true trades this for more communication).
    accum_grads = 4 * exact["unsharded_elements"] if (dp > 1 and accum > 1 and not reduce_every_micro_batch) else 0
    acts = {mode: activation_bytes(mcfg, seq_len=seq_len, micro=micro * passes, tp=layout.tp, ac=mode, ac_every=ac_every,
                                   ce_chunk=ce_chunk, attn_mask=attn_mask, row_loss_bytes=row_loss_bytes,
                                   input_multiplier=input_multiplier)
            for mode in AC_MODES}
    states = exact["params"] + exact["grads"] + exact["optimizer"]
    totals = {mode: states + fsdp + accum_grads + a["total"] for mode, a in acts.items()}
    capacity = gpu_gib * GiB
    warnings = []
    if totals[ac] > capacity:
        fits = [m for m in AC_MODES if totals[m] <= capacity]
        warnings.append(f"estimated peak {totals[ac] / GiB:.1f} GiB with activation checkpointing '{ac}' exceeds a "
                        f"{gpu_gib:g} GiB GPU" + (f"; fits with --ac {fits[0]}" if fits else
                                                   "; lower --micro-batch, raise --tp, or add GPUs"))
    elif totals[ac] > 0.9 * capacity:
        warnings.append(f"estimated peak {totals[ac] / GiB:.1f} GiB is within 10% of {gpu_gib:g} GiB: fragmentation "
                        f"and communication buffers may not fit")
    return {"model": mcfg.preset, "world": layout.world, "dims": exact["dims"], "seq_len": seq_len,
            "global_batch": global_batch, "micro_batch": micro, "grad_accum": accum,
            "tokens_per_step": global_batch * seq_len, "tokens_per_gpu_micro": micro * seq_len,
            "exact": {k: exact[k] for k in ("params", "grads", "optimizer", "local_param_elements")},
            "fsdp_buffers": fsdp, "accum_grads": accum_grads,
            "activations": {m: a["total"] for m, a in acts.items()},
            "attn_masks": acts[ac]["attn_masks"], "ce_head": acts[ac]["head"], "ce_chunk": ce_chunk,
            "attn_mask": attn_mask, "objective": objective,
            "ac": ac, "total": totals[ac], "totals": totals, "gpu_gib": gpu_gib, "warnings": warnings}


def _fmt(b: float) -> str:
    return f"{b / GiB:8.2f} GiB"


def render(p: dict) -> str:
    d = p["dims"]
    lines = [
        f"{p['model']} on {p['world']} GPUs: dp_replicate {d['dp_replicate']} x dp_shard {d['dp_shard']} x tp {d['tp']}",
        f"batch: {p['global_batch']} x {p['seq_len']} = {p['tokens_per_step']:,} tokens per step; micro-batch "
        f"{p['micro_batch']} ({p['tokens_per_gpu_micro']:,} tokens) per GPU, {p['grad_accum']} accumulation step(s)",
        *([f"run: {p['steps']:,} steps x {p['tokens_per_step']:,} tokens = {p['steps'] * p['tokens_per_step']:,} "
           f"tokens"] if p.get("steps") else []),
        "per-GPU memory (rank 0):",
        f"  parameters (fp32, sharded)     {_fmt(p['exact']['params'])}   exact",
        f"  gradients (fp32, sharded)      {_fmt(p['exact']['grads'])}   exact",
        f"  AdamW state (fp32, sharded)    {_fmt(p['exact']['optimizer'])}   exact",
        f"  FSDP gathered units            {_fmt(p['fsdp_buffers'])}   estimate",
        f"  accumulated unsharded grads    {_fmt(p['accum_grads'])}   estimate (reduced on the last micro-batch)",
        f"  attention masks ({p['attn_mask']:<6})       {_fmt(p['attn_masks'])}   estimate (in activations)",
        f"  head + CE (chunk {p['ce_chunk']:<6})      {_fmt(p['ce_head'])}   estimate (in activations)",
    ]
    for mode in AC_MODES:
        mark = "  <-" if mode == p["ac"] else ""
        lines.append(f"  activations, AC {mode:<10}     {_fmt(p['activations'][mode])}   estimate "
                     f"(total {p['totals'][mode] / GiB:.1f} GiB){mark}")
    lines.append(f"  total with AC {p['ac']:<10}       {_fmt(p['total'])}   of {p['gpu_gib']:g} GiB")
    lines += [f"WARNING: {w}" for w in p["warnings"]]
    return "\n".join(lines)


def _model_config(args):
    from model.config import get_preset
    if args.config:
        import yaml

        from pretrain.config import Config, from_dict
        cfg = from_dict(Config, yaml.safe_load(open(args.config)) or {})
        mcfg = cfg.model
        seq_len, batch, steps = cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.steps
        if args.objective is None:
            args.objective = cfg.diffusion.objective
        args.diffusion = cfg.diffusion
    else:
        mcfg, seq_len, batch, steps = get_preset(args.model), None, None, None
    if args.vocab_size:
        mcfg = replace(mcfg, vocab_size=args.vocab_size)
    if mcfg.vocab_size is None:
        sys.exit(f"{mcfg.preset or args.config} takes its vocabulary from the data: pass --vocab-size")
    return mcfg, seq_len, batch, steps


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model preset (python -m model lists them), e.g. llada-8b, 1028M")
    src.add_argument("--config", help="a run config YAML (its model section)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas (dp_shard is what remains)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the config's data.seq_len, else the "
                    "model's max_seq_len")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: the config's "
                    "train.global_batch_size, else one micro-batch per data-parallel rank)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--ac", choices=AC_MODES, default="full")
    ap.add_argument("--ce-chunk", type=int, default=4096, help="diffusion.ce_chunk (rows of logits at a time)")
    ap.add_argument("--attn-mask", choices=("flex", "dense", "varlen", "none"), default="flex",
                    help="the attention backend's per-batch mask: flex (auto on CUDA without flash-attn), dense "
                    "(sdpa), varlen (flash-attn), none (unpacked rows)")
    ap.add_argument("--reduce-every-micro-batch", action="store_true",
                    help="parallel.reduce_every_micro_batch: no unsharded gradients held across micro-batches")
    ap.add_argument("--ac-every", type=int, default=2)
    ap.add_argument("--param-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--objective", default=None, help="diffusion.objective (default: the config's, else mdm): "
                    "objectives with a per-row loss (uniform, hybrid, sedd, d3pm, dfm) count its bytes per logit, "
                    "time-conditioned ones an adaLN model")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    mcfg, cfg_seq, cfg_batch, cfg_steps = _model_config(args)
    layout = Layout(args.nodes, args.gpus_per_node, args.tp, args.dp_replicate)
    seq_len = args.seq_len or cfg_seq or mcfg.max_seq_len
    dp = layout.world // (layout.tp * layout.dp_replicate)
    global_batch = args.global_batch or cfg_batch or args.micro_batch * dp
    try:
        p = plan(mcfg, layout, seq_len=seq_len, global_batch=global_batch, micro=args.micro_batch, ac=args.ac,
                 ac_every=args.ac_every, param_dtype_bytes=2 if args.param_dtype == "bf16" else 4,
                 gpu_gib=args.gpu_memory_gib, ce_chunk=args.ce_chunk, attn_mask=args.attn_mask,
                 reduce_every_micro_batch=args.reduce_every_micro_batch, objective=args.objective or "mdm",
                 diffusion=getattr(args, "diffusion", None))
    except ValueError as e:
        sys.exit(f"plan error: {e}")
    p["model"] = p["model"] or args.config  # a recipe without a preset is named by its file
    p["steps"] = cfg_steps  # a recipe's train.steps: its whole run in tokens
    print(json.dumps(p, indent=1) if args.json else render(p))


if __name__ == "__main__":
    main()
