"""Time the training step (forward, backward, AdamW) in fp32 on CPU at the 25M benchmark shape.

Prints tokens/s, model FLOP/s and MFU against the fp32 matmul peak measured in the same run:
    FLOPs/token = 6 * N_nonembed + 6 * d_model * vocab + 12 * n_layers * d_model * seq
(the output head counted for every token even when it runs only at masked positions — see --full-head).

    python benchmarks/train_step.py [--steps 8] [--batch 8] [--seq 256] [--full-head] [--compile]
        [--objective block --block-size 16] [--baseline mdm]

--objective picks another registered objective (model/objectives; default mdm, the step above). Block
diffusion's network input is 2L tokens per sequence: its MFU is also shown counted on the 2L input.
--baseline times a second objective's step (same model and optimizer) alternating with the first, step by
step, so that a change of the machine's load hits both, and prints the step-time ratio (wall and this
process's CPU time: with --threads 1 the CPU-time ratio is the robust one on a busy machine).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Transformer, count_params, flops_per_token, get_preset  # noqa: E402
from model.objectives import LinearSchedule, sample_u  # noqa: E402
from model.objectives import DiffusionConfig, build_objective  # noqa: E402
from model.objectives.mdm import mdm_loss  # noqa: E402
from pretrain.loop.flops import measure_matmul_peak  # noqa: E402
from pretrain.loop.train import build_optimizer  # noqa: E402
from pretrain.config import OptimConfig  # noqa: E402


class FullHead(torch.nn.Module):
    """Wraps the model so the output head runs at every position (then selects), for comparison."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, doc_ids=None, key_padding=None, logits_at=None, targets=None, ce_chunk=0):
        logits = self.model(tokens, doc_ids, key_padding)
        logits = logits[logits_at] if logits_at is not None else logits
        if targets is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--full-head", action="store_true", help="run the output head at every position")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--objective", default="mdm", help="a registered objective (mdm, ar, block, ...)")
    ap.add_argument("--block-size", type=int, default=16, help="diffusion.block_size for --objective block")
    ap.add_argument("--baseline", default="", help="an objective to time interleaved with --objective (e.g. mdm)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = get_preset("bench-25m")
    names = [args.objective] + ([args.baseline] if args.baseline else [])
    objs = {name: build_objective(DiffusionConfig(objective=name, block_size=args.block_size), mask_id=cfg.mask_id,
                                  vocab_size=cfg.vocab_size) for name in names}
    obj = objs[args.objective]
    if len({o.causal for o in objs.values()}) > 1:
        raise SystemExit(f"--baseline {args.baseline}: one model serves both objectives, so both must be causal or "
                         f"both bidirectional ({args.objective} and {args.baseline} differ)")
    cfg.causal = obj.causal
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    counts = count_params(model)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    net = FullHead(model) if args.full_head else model
    if args.compile:
        net = torch.compile(net)
    schedule = LinearSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.seq), generator=gen)

    counter = iter(range(1 << 30))

    def step(name):
        if name == "mdm":
            u = sample_u(args.batch, gen, stratified=True)
            loss, _ = mdm_loss(net, x0, u, torch.rand(args.batch, args.seq, generator=gen), mask_id=cfg.mask_id,
                               schedule=schedule, eps=1e-3)
        else:  # the objective's own draw, noise and loss (as the trainer runs them)
            loss, _ = objs[name].micro_loss(net, x0, objs[name].draw(0, next(counter), args.batch, args.seq),
                                            ce_chunk=4096)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    peaks = [measure_matmul_peak()]
    for _ in range(args.warmup):
        for name in names:
            step(name)
    walls = {name: [] for name in names}
    cpus = {name: [] for name in names}
    for _ in range(args.steps):
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    times = walls[args.objective]
    peaks.append(measure_matmul_peak())
    peak = max(peaks)
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq, counts["non_embedding"])
    mult = obj.input_multiplier
    fpt_in = flops_per_token(cfg, args.seq * mult, counts["non_embedding"])  # per token of the network input
    best, med = min(times), statistics.median(times)
    rows = [("params (total / non-embedding)", f"{counts['total'] / 1e6:.1f}M / {counts['non_embedding'] / 1e6:.1f}M"),
            ("shape", f"d {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.ffn_dim}, vocab "
                      f"{cfg.vocab_size}, seq {args.seq}, batch {args.batch}"),
            ("threads", str(torch.get_num_threads())),
            ("output head", "all positions" if args.full_head else "masked positions only"),
            ("compile", str(args.compile)),
            ("objective", args.objective + (f" (block {args.block_size}, {mult}L input)" if mult > 1 else "")),
            ("FLOPs / token", f"{fpt / 1e6:.1f}M"),
            ("fp32 matmul peak (1024^3, best of the probes)", f"{peak / 1e9:.1f} GFLOP/s"),
            ("step time (median / best)", f"{med * 1e3:.0f} / {best * 1e3:.0f} ms"),
            ("tokens/s (median)", f"{tokens / med:,.0f}"),
            ("model FLOP/s (median)", f"{tokens * fpt / med / 1e9:.1f} GFLOP/s"),
            ("MFU (median / best step)", f"{100 * tokens * fpt / med / peak:.1f}% / "
                                         f"{100 * tokens * fpt / best / peak:.1f}%")]
    if mult > 1:
        rows.append((f"MFU on the {mult}L input (median / best)",
                     f"{100 * mult * tokens * fpt_in / med / peak:.1f}% / {100 * mult * tokens * fpt_in / best / peak:.1f}%"))
    if args.baseline:
        b_walls, b_cpus = walls[args.baseline], cpus[args.baseline]
        b_med = statistics.median(b_walls)
        rows += [(f"{args.baseline} step time, interleaved (median / best)",
                  f"{b_med * 1e3:.0f} / {min(b_walls) * 1e3:.0f} ms"),
                 (f"{args.baseline} MFU on L tokens (median)", f"{100 * tokens * fpt / b_med / peak:.1f}%"),
                 (f"step ratio {args.objective} / {args.baseline}, wall (median / best)",
                  f"{med / b_med:.2f} / {best / min(b_walls):.2f}"),
                 (f"step ratio {args.objective} / {args.baseline}, CPU time (median / best)",
                  f"{statistics.median(cpus[args.objective]) / statistics.median(b_cpus):.2f} / "
                  f"{min(cpus[args.objective]) / min(b_cpus):.2f}")]
    width = max(len(k) for k, _ in rows)
    print(f"| {'quantity'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
