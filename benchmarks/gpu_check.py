"""The GPU check: correctness, speed and memory of the training step on one CUDA device, in one command that
cannot lose its results.

    python benchmarks/gpu_check.py --out runs/gpu_check                 # <= --budget-s 300 of rows, ~6 min
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check       # tiny shapes on CPU: the same row logic
    python benchmarks/gpu_check.py --rows 2.3,2.4,1b --out runs/gpu_check_2   # a second command: other rows

Order of work:
0. Pre-flight (seconds): a C compiler and Python headers (Triton builds its launcher with them), Triton,
   `torch.compile` of a tiny function on the device, FlexAttention, PyYAML (launch.plan, Table 3), FSDP,
   float8. A failed check never stops the run: every row that depends on it becomes "skipped: <reason>".
1. Rows, most important first. Each row is guarded (an exception is its result), written to its table's
   .jsonl file and printed the moment it finishes. Compiler state is reset and memory freed between rows.
   A row that would overrun --budget-s is skipped before it starts: its expected cost is the measured cost
   of the first row of its kind (compiled or eager), i.e. the first compiled row's warm-up plus its steps.
   At --deadline-s (default: budget + 120 s) an alarm (SIGALRM; SIGTERM, e.g. from `timeout`, does the same)
   stops the row in progress, marks it and every later row, writes every file and exits 0; a watchdog thread
   does the same 20 s later if the main thread is stuck inside a device call.

Tables (docs/performance.md shows the layout):
- 1a precision: loss and gradients of bf16 autocast over fp32 weights (1 GPU, TP only) and of FSDP2 bf16
  parameters on a 1-rank group, against an fp32 reference (SDPA: the precision policy must not depend on flex).
- 1b attention: every backend (sdpa, flex, flash when installed) against the fp32 dense-mask reference on
  packed, left-padded, one-document and ragged (L not a multiple of 128, grouped KV heads) batches.
- 2 speed of the trainer's own step (pretrain/loop/step.py, the trainer's optimizer): tokens/s, MFU against
  the datasheet bf16 peak and the matmul peak measured in this run, peak allocated and reserved memory,
  warm-up (compile) time. 2.1 1028M at seq 2048 with flex, compile, op AC; 2.2 the same with dense-mask
  SDPA; 2.3 no activation checkpointing (fits an H200); 2.4 one document per row; 2.5 FSDP2 on a 1-rank
  mesh (the multi-GPU code path); 2.6 a llada-8b-shaped 2-layer slice; 2.7 full AC; 2.8-2.9 eager blocks;
  2.10 float8 (torchao).
- 2b attention kernels alone: one mask, FlexAttention (block mask) against SDPA (the same mask, dense).
  Adding a mask is one entry of KERNEL_MASKS (a mask_mod factory): e.g. block diffusion's.
- 3 memory: launch.plan's prediction next to each speed row's measured peak.

Files under --out: preflight.json; correctness.jsonl, speed.jsonl, kernels.jsonl, memory.jsonl (one line per
row, as it finishes); at the end (or at the deadline) correctness.json, speed.json, memory.json, tables.md;
errors.log (tracebacks of failed rows).

--dry-run: tiny shapes, CPU by default (`--device cuda` runs them on the GPU: a toolchain smoke test); on CPU
blocks compile with dynamo's "eager" backend (the same tracing, graphs and activation checkpointing, no code
generation) and flex rows run SDPA (FlexAttention has no CPU backward). --force-preflight-fail NAMES and
--force-overrun make a dry run exercise the failure paths.

Needs torch (flash-attn, torchao and PyYAML are used when present). The batches are built here (random
documents packed into rows with document ids): no data, tokenizer, network or download.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.attention as attention_module  # noqa: E402
from model import ModelConfig, Transformer, count_params, flops_per_token, get_preset  # noqa: E402
from model.attention import (AttentionBatch, attention, build_mask, flash_available, needs_mask,  # noqa: E402
                             resolve_backend)
from model.objectives import DiffusionConfig, build_objective, get_schedule  # noqa: E402
from model.params import flops_by_term  # noqa: E402
from pretrain.engines import parallel  # noqa: E402
from pretrain.engines.native import NativeEngine  # noqa: E402
from pretrain.loop.flops import _CUDA_PEAKS, measure_matmul_peak  # noqa: E402
from pretrain.loop.step import precision_context, train_step  # noqa: E402

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


class DeadlineReached(BaseException):
    """Raised by the alarm in the main thread (a BaseException: no row's guard catches it)."""


# ----------------------------------------------------------------------------- batches

def packed_docs(batch: int, seq: int, vocab: int, mean_doc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of documents (exponential lengths, mean `mean_doc`) packed end to end, with document ids."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab - 1, (batch, seq), generator=g)
    docs = torch.empty(batch, seq, dtype=torch.long)
    next_id = 0
    for b in range(batch):
        pos = 0
        while pos < seq:
            n = max(1, int(-mean_doc * math.log(1.0 - float(torch.rand((), generator=g)))))
            docs[b, pos:pos + n] = next_id
            next_id, pos = next_id + 1, pos + n
    return tokens, docs


class BatchSource:
    """The loader interface train_step uses (rank_positions, micro_batch), over fixed synthetic batches."""

    def __init__(self, global_batch: int, seq: int, vocab: int, mean_doc: int):
        self.G = global_batch
        self.x, self.doc = packed_docs(global_batch, seq, vocab, mean_doc, seed=0)
        if mean_doc >= seq:  # one document per row: no mask at all
            self.doc = torch.zeros_like(self.doc)

    def rank_positions(self, start: int, count: int) -> list[int]:
        return list(range(count))

    def micro_batch(self, consumed: int, G: int, micro: int, m: int):
        return self.x[m * micro:(m + 1) * micro], self.doc[m * micro:(m + 1) * micro]


def run_config(mcfg: ModelConfig, *, seq: int, global_batch: int):
    """The parts of a run config the trainer's step reads: masked diffusion (mdm, linear schedule, stratified t,
    ce_chunk 4096: the defaults), no random-length steps (every step the full length)."""
    return SimpleNamespace(model=mcfg, train=SimpleNamespace(global_batch_size=global_batch, seed=0),
                           data=SimpleNamespace(seq_len=seq, random_length_prob=0.0), diffusion=DiffusionConfig())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_rank_mesh(device):
    """A 1-rank process group (NCCL on CUDA, gloo on CPU) and its 1-D mesh: the FSDP2 code path on one device."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))


# ----------------------------------------------------------------------------- table 1a: precision

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class PrecisionCheck:
    """bf16 (the trainer's 1-GPU policy, and FSDP2 bf16 parameters on a 1-rank group) against an fp32
    reference. SDPA throughout: the precision policy must not depend on the attention backend (flex is Table
    1b's). The reference is computed once, by whichever row runs first."""

    def __init__(self, device, dry: bool):
        self.device, self.dry = device, dry
        if dry:
            self.mcfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=257, mask_id=256,
                                    max_seq_len=128, attn_backend="sdpa")
            B, L = 2, 128
        else:
            self.mcfg = ModelConfig(dim=1024, n_layers=4, n_heads=16, ffn_dim=4096, vocab_size=32001, mask_id=32000,
                                    max_seq_len=2048, attn_backend="sdpa")
            B, L = 4, 2048
        x, doc = packed_docs(B, L, self.mcfg.vocab_size, mean_doc=L // 3, seed=1)
        self.x, self.doc = x.to(device), doc.to(device)
        g = torch.Generator(device=device).manual_seed(0)
        self.u = torch.rand(B, generator=g, device=device) * 0.98 + 0.01
        self.noise = torch.rand(B, L, generator=g, device=device)
        self.reference = None

    def loss_and_grads(self, model, ctx):
        from model.objectives.mdm import mdm_loss
        model.zero_grad(set_to_none=True)
        with ctx():
            loss, _ = mdm_loss(model, self.x, self.u, self.noise, mask_id=self.mcfg.mask_id,
                               schedule=get_schedule("linear"), eps=1e-3, doc_ids=self.doc, ce_chunk=4096)
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().float().clone()
                 for n, p in model.named_parameters()}
        return loss.detach().float(), grads

    def ref(self):
        if self.reference is None:
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                model = Transformer(self.mcfg).to(self.device)
                model.init_weights(seed=0)
                loss, grads = self.loss_and_grads(model, precision_context(self.device, False, fsdp=False))
                self.reference = (loss, grads, {k: v.detach().clone() for k, v in model.state_dict().items()})
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
        return self.reference

    def compare(self, loss, grads) -> dict:
        ref_loss, ref_grads, _ = self.ref()
        per = {n: rel(grads[n], ref_grads[n]) for n in ref_grads}
        total = float(torch.sqrt(sum((grads[n] - ref_grads[n]).pow(2).sum() for n in ref_grads)) /
                      torch.sqrt(sum(g.pow(2).sum() for g in ref_grads.values())))
        worst = max(per, key=per.get)
        return {"loss_fp32": float(ref_loss), "loss": float(loss),
                "loss_rel_err": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)), "grad_rel_err": total,
                "worst_tensor": worst, "worst_tensor_rel_err": per[worst]}

    def autocast_row(self) -> dict:
        state = self.ref()[2]
        model = Transformer(self.mcfg).to(self.device)
        model.load_state_dict(state)
        return self.compare(*self.loss_and_grads(model, precision_context(self.device, True, fsdp=False)))

    def fsdp_row(self) -> dict:
        self.ref()
        mesh = one_rank_mesh(self.device)
        with torch.device("meta"):
            model = Transformer(self.mcfg)
        parallel.apply_fsdp(model, mesh, torch.bfloat16)
        model.to_empty(device=self.device)
        parallel.init_weights(model, seed=0)
        return self.compare(*self.loss_and_grads(model, precision_context(self.device, True, fsdp=True)))


# ----------------------------------------------------------------------------- table 1b: attention backends

def attention_cases(device, dry: bool) -> dict:
    """name -> (B, H, Hkv, L, D, doc ids, key padding)."""
    B, H, Hkv, L, D = (2, 4, 2, 64, 16) if dry else (2, 16, 16, 2048, 128)
    docs = packed_docs(B, L, 10, mean_doc=L // 4, seed=2)[1].to(device)
    left = torch.ones(B, L, dtype=torch.bool, device=device)
    left[1, :L // 3] = False
    # A left-padded row is padding then documents; the padding carries the first document's id, so every
    # (ignored) padding query still sees a key: a fully masked query row would put NaN into SDPA's backward.
    left_docs = docs.clone()
    left_docs[1, :L // 3] = left_docs[1, L // 3]
    # A random-length step: L not a multiple of flex's 128 tile (partial tiles, the dynamic-length graph),
    # with grouped KV heads.
    Lr = 50 if dry else 1000
    ragged_docs = packed_docs(B, Lr, 10, mean_doc=Lr // 3, seed=5)[1].to(device)
    return {"packed": (B, H, Hkv, L, D, docs, None), "left_padded": (B, H, Hkv, L, D, left_docs, left),
            "one_doc_per_row": (B, H, Hkv, L, D, torch.zeros_like(docs), None),
            f"ragged L={Lr}, GQA {H}/{H // 4}": (B, H, H // 4, Lr, D, ragged_docs, None)}


def attention_row(device, case, backend: str) -> dict:
    B, H, Hkv, L, D, doc, keep = case
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(3)
    q0, k0, v0 = (torch.randn(B, h, L, D, generator=g, device=device) for h in (H, Hkv, Hkv))
    real = keep if keep is not None else torch.ones(B, L, dtype=torch.bool, device=device)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    mask = build_mask(doc, keep, False, L, L, device)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                         attn_mask=mask)
    ref_sel = ref.transpose(1, 2)[real]
    ref_grads = torch.autograd.grad(ref_sel.float().pow(2).sum(), (q, k, v))
    no_backward = device.type == "cpu" and backend == "flex"  # no CPU backward (torch 2.13)
    qb, kb, vb = (t.detach().to(dtype).requires_grad_(not no_backward) for t in (q0, k0, v0))
    batch = AttentionBatch.build(doc, keep, causal=False, backend=backend, seq_len=L, device=device, dtype=dtype)
    entry = {"path": batch.backend + (" (unmasked)" if batch.mask is None and batch.block_mask is None
                                      and batch.varlen is None else "")}
    out = attention(qb, kb, vb, causal=False, batch=batch)
    sel = out.transpose(1, 2)[real]
    entry["fwd_rel_err"] = rel(sel, ref_sel)
    if no_backward:
        entry["bwd_rel_err"] = None
    else:
        grads = torch.autograd.grad(sel.float().pow(2).sum(), (qb, kb, vb))
        entry["bwd_rel_err"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
    return entry


# ----------------------------------------------------------------------------- table 2: speed

# Dense bf16 datasheet peaks, most specific device name first (torch.cuda.get_device_name: the H100 SXM5 is
# "NVIDIA H100 80GB HBM3"); then the trainer's table (pretrain/loop/flops.py), which maps every H100 to SXM.
_PEAKS_FIRST = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GB200", 2.5e15))


def datasheet_peak(device) -> tuple[float, str]:
    if device.type != "cuda":
        return float("nan"), "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, value in (*_PEAKS_FIRST, *_CUDA_PEAKS.items()):
        if key in name:
            return value, name
    return float("nan"), name


def float8_ready(device) -> str:
    """'' when float8 training can run here, else why not."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "no float8 tensor cores"
    if importlib.util.find_spec("torchao") is None:
        return "torchao not installed"
    return ""


def trainer_optimizer(model) -> tuple[torch.optim.Optimizer, str]:
    """The trainer's own optimizer (pretrain/loop/train.build_optimizer with the default optim config), so the
    step is timed as training runs it; a plain AdamW of the same defaults where the trainer cannot import."""
    try:
        from pretrain.config import OptimConfig
        from pretrain.loop.train import build_optimizer
        cuda = next(model.parameters()).device.type == "cuda"
        opt = build_optimizer(model, OptimConfig(), fused=True if cuda else None)  # as the trainer builds it
    except Exception as e:  # noqa: BLE001  (e.g. no PyYAML: pretrain.config imports it)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        return opt, f"AdamW (build_optimizer unavailable: {type(e).__name__})"
    d = opt.defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "torch's default (foreach on CUDA)"
    return opt, f"build_optimizer: AdamW {kind}"


@dataclass
class SpeedSpec:
    name: str
    mcfg: ModelConfig
    backend: str
    compile_: bool
    ac: str
    seq: int
    micro: int
    mean_doc: int
    steps: int
    warmup: int
    fsdp: bool = False
    float8: bool = False


def speed_fields(s: SpeedSpec) -> dict:
    return {"config": s.name, "backend": s.backend, "compile": s.compile_, "ac": s.ac, "seq": s.seq,
            "micro": s.micro, "packed": s.mean_doc < s.seq, "fsdp": s.fsdp}


def speed_run(device, spec: SpeedSpec, peaks: dict, dry: bool, overrun: Callable[[], None] = lambda: None) -> dict:
    """The trainer's step on this configuration: warm-up steps (compilation), then the median of timed steps."""
    backend = spec.backend
    if backend == "flex" and device.type == "cpu":
        backend = "sdpa"  # FlexAttention has no CPU backward: a CPU dry run times the row's logic on SDPA
    mcfg = ModelConfig(**{**spec.mcfg.__dict__, "attn_backend": backend})
    entry = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device("meta"):
        model = Transformer(mcfg)
    counts = count_params(model)
    if spec.float8:
        parallel.apply_float8(model)
    parallel.apply_ac(model, spec.ac)
    if spec.compile_:
        parallel.apply_compile(model)
    if spec.fsdp:  # FSDP2 on a 1-rank mesh: bf16 parameters gathered per unit, no autocast (every dp layout)
        parallel.apply_fsdp(model, one_rank_mesh(device), torch.bfloat16 if device.type == "cuda" else None)
    model.to_empty(device=device)
    parallel.init_weights(model, seed=0)
    optimizer, entry["optimizer"] = trainer_optimizer(model)
    engine = NativeEngine(model, optimizer, grad_clip=1.0, accum=1, checkpointer=None)
    cfg = run_config(mcfg, seq=spec.seq, global_batch=spec.micro)
    source = BatchSource(spec.micro, spec.seq, mcfg.vocab_size, spec.mean_doc)
    precision = precision_context(device, device.type == "cuda", fsdp=spec.fsdp)
    masked = needs_mask(source.doc, None)  # the backend the model picks for these batches (no mask built)
    name = resolve_backend(backend, device, masked, torch.bfloat16 if device.type == "cuda" else torch.float32)
    entry["path"] = name if masked else f"{'sdpa' if name == 'flex' else name} (unmasked)"
    dims = parallel.ParallelDims(1, 1, 1, 1)
    objective = build_objective(cfg.diffusion, mask_id=mcfg.mask_id, vocab_size=mcfg.vocab_size)
    t_first = time.perf_counter()
    times = []
    for i in range(spec.warmup + spec.steps):
        sync(device)
        t0 = time.perf_counter()
        result = train_step(engine, cfg, source, step=i, consumed=0, micro=spec.micro, accum=1, dims=dims,
                            device=device, objective=objective, precision=precision)
        float(result.loss)  # a host sync, as the trainer's logging does
        sync(device)
        if i >= spec.warmup:
            times.append(time.perf_counter() - t0)
        if i == spec.warmup - 1:
            entry["warmup_s"] = time.perf_counter() - t_first
            overrun()  # --force-overrun: pretend this warm-up took longer than the whole budget
    med = sorted(times)[len(times) // 2]
    tokens = spec.micro * spec.seq
    fpt = flops_per_token(mcfg, spec.seq, counts["non_embedding"])
    honest = flops_by_term(mcfg, spec.seq, counts["non_embedding"], head_fraction=0.5 + 0.5e-3)["total"]
    entry.update({"step_s": med, "tokens_per_s": tokens / med, "flops_per_token": fpt,
                  "mfu_datasheet": tokens * fpt / med / peaks["datasheet"],
                  "mfu_measured_peak": tokens * fpt / med / peaks["measured"],
                  "mfu_datasheet_masked_head": tokens * honest / med / peaks["datasheet"],
                  "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                  "peak_reserved_gib": (torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda"
                                        else None),
                  "loss": float(result.loss), "params": counts["total"]})
    del model, optimizer, engine
    return entry


def memory_row(spec: SpeedSpec, measured: dict) -> dict:
    """launch.plan's prediction for one device, the same micro-batch, AC mode and mask kind, next to the peak."""
    from launch.plan import Layout, plan
    path = measured.get("path", spec.backend)
    mask = ("none" if "unmasked" in path else
            {"sdpa": "dense", "flex": "flex", "flash": "varlen"}.get(path.split()[0], "flex"))
    p = plan(spec.mcfg, Layout(1, 1), seq_len=spec.seq, global_batch=spec.micro, micro=spec.micro, ac=spec.ac,
             ac_every=2, gpu_gib=141.0, ce_chunk=4096, attn_mask=mask)
    return {"predicted_gib": p["total"] / 2**30, "measured_gib": measured.get("peak_mem_gib"),
            "reserved_gib": measured.get("peak_reserved_gib"), "mask": mask}


# ----------------------------------------------------------------------------- table 2b: attention kernels

def document_mask(B: int, L: int, device):
    """Packed documents (mean 700 tokens at L 2048): the training batches' mask."""
    doc = packed_docs(B, L, 10, mean_doc=max(8, L * 700 // 2048), seed=4)[1].to(device)

    def same_document(b, h, q, kv):
        return doc[b, q] == doc[b, kv]
    return same_document


def block_diffusion_mask(B: int, L: int, device, block_size: int = 16):
    """BD3-LM's training mask over the 2L input [x_t, x_0] (model/objectives/block.py; here L is the attention
    length, so sequences of L / 2), ANDed with packed documents."""
    from model.objectives.block import pair_allowed
    half = L // 2
    doc = packed_docs(B, half, 10, mean_doc=max(8, half * 700 // 2048), seed=7)[1].to(device)
    doc = torch.cat([doc, doc], 1)

    def block_diffusion(b, h, q, kv):
        return pair_allowed(q, kv, half, block_size) & (doc[b, q] == doc[b, kv])
    return block_diffusion


# name -> factory (B, L, device) -> mask_mod (b, h, q, kv) -> bool. A new mask is one entry here: both rows
# (flex with its block mask, SDPA with the same mask dense) follow.
KERNEL_MASKS: dict[str, Callable] = {"documents": document_mask, "block diffusion": block_diffusion_mask}


def kernel_run(device, mask_factory, backend: str, dry: bool) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention
    B, H, L, D = (2, 4, 256, 16) if dry else (8, 14, 2048, 128)  # the 1028M attention shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mask_mod = mask_factory(B, L, device)
    g = torch.Generator(device=device).manual_seed(6)
    backward = not (device.type == "cpu" and backend == "flex")  # no CPU backward (torch 2.13)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device=device, dtype=dtype).requires_grad_(backward)
               for _ in range(3))
    compiled = device.type in attention_module.COMPILED_ON
    if backend == "flex":
        make = attention_module.compiled_create_block_mask() if compiled else create_block_mask
        block_mask = make(mask_mod, B, None, L, L, device=device)
        fn = attention_module.compiled_flex() if compiled else flex_attention

        def run():
            return fn(q, k, v, block_mask=block_mask)
    else:
        dense = create_mask(mask_mod, B, 1, L, L, device=device)

        def run():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    density = float(create_mask(mask_mod, B, 1, L, L, device=device).float().mean())
    warmup, iters = (1, 2) if dry else (3, 10)
    t_first = time.perf_counter()
    times = []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        out = run()
        if backward:
            out.backward(torch.ones_like(out))
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if i == warmup - 1:
            warm = time.perf_counter() - t_first
    med = sorted(times)[len(times) // 2]
    flops = 4 * B * H * L * L * D * (3.5 if backward else 1.0)  # dense-equivalent; backward = 2.5 forwards
    return {"shape": f"{B}x{H}x{L}x{D}", "passes": "fwd+bwd" if backward else "fwd", "ms": med * 1e3,
            "dense_tflops": flops / med / 1e12, "mask_density": density, "warmup_s": warm}


# ----------------------------------------------------------------------------- rows, pre-flight, budget

@dataclass
class Row:
    """One line of one table: `run` measures it; the runner guards, times, streams and budgets it."""
    id: str  # "2.1", "1b.packed.flex", ...: what --rows selects
    table: str  # precision | attention | speed | kernels
    fields: dict  # what identifies the row in its table (shown for skipped rows too)
    run: Callable[[], dict]
    needs: tuple = ()  # pre-flight checks it depends on
    compiled: bool = False  # its cost class for the budget: compiled rows pay a warm-up
    spec: Optional[SpeedSpec] = None  # speed rows: Table 3 follows from it


def compile_needs(device) -> tuple:
    return ("compiler", "python_headers", "triton", "compile") if device.type == "cuda" else ("compile",)


def preflight(device, compile_backend, forced: set) -> dict:
    """name -> '' (ok) or why not. Seconds: no model, one tiny compiled function."""
    checks = {}
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    checks["compiler"] = "" if cc and shutil.which(cc) else "no C compiler (cc/gcc/clang, or $CC): Triton needs one"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    checks["python_headers"] = "" if header.exists() else f"no Python headers ({header} missing: python3-dev)"
    if device.type == "cuda":
        checks["triton"] = "" if importlib.util.find_spec("triton") else "Triton not installed"
    for name in ("compiler", "python_headers", "triton"):
        if name in forced and name in checks:
            checks[name] = "forced failure (--force-preflight-fail)"
    prior = [checks[n] for n in compile_needs(device)[:-1] if checks[n]]
    if "compile" in forced:
        checks["compile"] = "forced failure (--force-preflight-fail)"
    elif prior:
        checks["compile"] = f"not tried: {prior[0]}"
    else:
        try:
            f = torch.compile(lambda x: x.sin() + 1, backend=compile_backend, fullgraph=True)
            x = torch.ones(8, device=device)
            ok = torch.allclose(f(x), x.sin() + 1)
            sync(device)
            checks["compile"] = "" if ok else "torch.compile computed a wrong result"
        except Exception as e:  # noqa: BLE001
            checks["compile"] = f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}"
        finally:
            torch.compiler.reset()
    if "flex" in forced:
        checks["flex"] = "forced failure (--force-preflight-fail)"
    elif importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        checks["flex"] = "FlexAttention not in this torch"
    else:
        checks["flex"] = ""
    checks["yaml"] = ("forced failure (--force-preflight-fail)" if "yaml" in forced else
                      "" if importlib.util.find_spec("yaml") else "PyYAML not installed (launch.plan needs it)")
    import torch.distributed as dist
    checks["fsdp"] = ("forced failure (--force-preflight-fail)" if "fsdp" in forced else
                      "" if dist.is_available() else "torch.distributed unavailable")
    checks["float8"] = "forced failure (--force-preflight-fail)" if "float8" in forced else float8_ready(device)
    return checks


class Budget:
    """Starts a row only if its expected cost fits: the measured cost of the first row of its kind."""

    def __init__(self, limit_s: float):
        self.limit = limit_s
        self.measured: dict = {}  # (table, compiled) -> seconds

    def expected(self, row: Row) -> Optional[float]:
        return self.measured.get((row.table, row.compiled))

    def refuse(self, row: Row) -> str:
        left = self.limit - elapsed()
        if left <= 0:
            return f"skipped: time budget {self.limit:.0f} s spent"
        cost = self.expected(row)
        if cost is not None and cost > left:
            return f"skipped: would overrun the budget (expected ~{cost:.0f} s, {left:.0f} s left of {self.limit:.0f})"
        return ""

    def record(self, row: Row, seconds: float) -> None:
        self.measured.setdefault((row.table, row.compiled), seconds)


# ----------------------------------------------------------------------------- output

FILES = {"precision": "correctness", "attention": "correctness", "speed": "speed", "kernels": "kernels",
         "memory": "memory"}


def fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def note(r: dict) -> str:
    return r.get("skipped") or (f"error: {r['error']}" if "error" in r else "")


def line(table: str, r: dict) -> str:
    """One table line (markdown), the same printed as the row finishes and in tables.md."""
    if table == "precision":
        if note(r):
            return f"| {r['policy']} | {note(r)} | | | | |"
        return (f"| {r['policy']} | {r['loss_fp32']:.5f} | {r['loss']:.5f} | {fmt(r['loss_rel_err'])} | "
                f"{fmt(r['grad_rel_err'])} | {r['worst_tensor']} ({fmt(r['worst_tensor_rel_err'])}) |")
    if table == "attention":
        if note(r):
            return f"| {r['case']} | {r['backend']} | {note(r)} | | |"
        bwd = fmt(r["bwd_rel_err"]) if r.get("bwd_rel_err") is not None else "n/a (no CPU backward)"
        return f"| {r['case']} | {r['backend']} | {r['path']} | {fmt(r['fwd_rel_err'])} | {bwd} |"
    if table == "speed":
        head = (f"| {r['id']} {r['config']}{' FSDP 1-rank' if r.get('fsdp') else ''} | {r['backend']} | "
                f"{'on' if r['compile'] else 'off'} | {r['ac']} | {r['seq']} x {r['micro']} |")
        if note(r):
            return f"{head} {note(r)} | | | | | | |"
        return (f"{head} {r['tokens_per_s']:,.0f} | {100 * r['mfu_datasheet']:.1f}% | "
                f"{100 * r['mfu_measured_peak']:.1f}% | {100 * r['mfu_datasheet_masked_head']:.1f}% | "
                f"{fmt(r['peak_mem_gib'], '.1f')} / {fmt(r['peak_reserved_gib'], '.1f')} | "
                f"{fmt(r.get('warmup_s'), '.0f')} | {r['path']}; {r['optimizer']} |")
    if table == "kernels":
        head = f"| {r['mask']} | {r['backend']} |"
        if note(r):
            return f"{head} {note(r)} | | | | |"
        return (f"{head} {r['shape']} {r['passes']} | {r['ms']:.3g} | {fmt(r['dense_tflops'])} | "
                f"{r['mask_density']:.2f} | {r['warmup_s']:.0f} |")
    if note(r):
        return f"| {r['id']} {r['config']} | {r['backend']} | {r['ac']} | {note(r)} | | |"
    return (f"| {r['id']} {r['config']} | {r['backend']} | {r['ac']} | {fmt(r['predicted_gib'])} ({r['mask']} mask) | "
            f"{fmt(r['measured_gib'], '.1f')} | {fmt(r['reserved_gib'], '.1f')} |")


HEADERS = {
    "precision": ["Table 1a: precision (relative error against fp32; SDPA)", "",
                  "| policy | loss fp32 | loss | loss rel err | grad rel err (global) | worst tensor (rel err) |",
                  "|---|---|---|---|---|---|"],
    "attention": ["Table 1b: attention backends against the fp32 dense-mask reference (real query rows)", "",
                  "| batch | backend | path taken | forward rel err | backward rel err |", "|---|---|---|---|---|"],
    "speed": ["Table 2: speed of the trainer's step (bf16, one device; flex computes only the tiles its mask "
              "keeps, so its MFU counts skipped tiles as work)", "",
              "| row | backend | compile | AC | seq x micro | tokens/s | MFU datasheet | MFU measured peak | "
              "MFU datasheet, head at masked only | peak GiB allocated / reserved | warm-up s | path; optimizer |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"],
    "kernels": ["Table 2b: attention kernels alone (one mask; SDPA gets it dense)", "",
                "| mask | backend | shape, passes | ms | dense-equivalent TFLOP/s | mask density | warm-up s |",
                "|---|---|---|---|---|---|---|"],
    "memory": ["Table 3: launch.plan's prediction against the measured peak (one device)", "",
               "| row | backend | AC | predicted GiB | measured GiB allocated | reserved |",
               "|---|---|---|---|---|---|"],
}


class Report:
    """Everything measured so far. Rows go to their .jsonl file and stdout as they finish; finish() writes the
    summaries. While either writes, the alarm only records itself (`pending`): add() raises it once its line
    is whole, so no file is ever cut halfway through a row."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta = out, meta
        self.lock = threading.RLock()
        self.rows = {table: [] for table in HEADERS}
        self.current: Optional[tuple] = None  # (table, fields, has a memory row) of the row in progress
        self.finished = False
        self.writing = 0  # > 0 while a file is being written
        self.pending = ""  # an alarm that arrived meanwhile
        self.stopping = False  # the alarm has fired: later signals are ignored
        for name in set(FILES.values()):
            (out / f"{name}.jsonl").write_text("")

    def alarm(self, why: str) -> None:
        """The signal handler's entry: stop now (raise in the main thread), or right after the current write."""
        if self.stopping:
            return
        if self.writing:
            self.pending = why
            return
        self.stopping = True
        raise DeadlineReached(why)

    def add(self, table: str, row: dict) -> None:
        with self.lock:
            self.writing += 1
            try:
                self.rows[table].append(row)
                with open(self.out / f"{FILES[table]}.jsonl", "a") as f:
                    f.write(json.dumps({"table": table, **row}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                print(f"[{elapsed():5.0f}s] {line(table, row)}", flush=True)
            finally:
                self.writing -= 1
        if self.pending and not self.writing and not self.stopping:
            why, self.pending = self.pending, ""
            self.alarm(why)

    def tables(self) -> str:
        m = self.meta
        out = [f"GPU check: {m['device']} | torch {m['torch']} | CUDA {m['cuda']} | {m['date']} | "
               f"{elapsed():.0f} s" + (" | DRY RUN (tiny shapes)" if m["dry_run"] else "")
               + (f" | STOPPED: {m['stopped']}" if m.get("stopped") else ""),
               f"peaks: datasheet bf16 {fmt(m['peak_datasheet'] / 1e12, '.4g')} TFLOP/s, measured matmul "
               f"{fmt(m['peak_measured'] / 1e12, '.4g')} TFLOP/s (bf16 on CUDA, fp32 on CPU); flash-attn "
               f"{'installed' if m['flash_attn'] else 'not installed'}; budget {m['budget_s']:.0f} s, deadline "
               f"{m['deadline_s']:.0f} s",
               "pre-flight (" + f"{m.get('preflight_s', 0):.1f} s): " +
               ", ".join(f"{k} {'ok' if not v else 'FAILED: ' + v}" for k, v in m.get("preflight", {}).items()), ""]
        for table in ("precision", "attention", "speed", "kernels", "memory"):
            out += HEADERS[table] + [line(table, r) for r in self.rows[table]] + [""]
        return "\n".join(out)

    def finish(self, stopped: str = "") -> None:
        with self.lock:
            if self.finished:
                return
            self.writing += 1  # from here on an alarm changes nothing: everything is being written
            if stopped:
                self.meta["stopped"] = stopped
            self.meta["elapsed_s"] = elapsed()
            out = self.out
            (out / "correctness.json").write_text(json.dumps({"precision": self.rows["precision"],
                                                              "attention": self.rows["attention"]}, indent=1))
            (out / "speed.json").write_text(json.dumps({"meta": self.meta, "rows": self.rows["speed"],
                                                        "kernels": self.rows["kernels"]}, indent=1))
            (out / "memory.json").write_text(json.dumps(self.rows["memory"], indent=1))
            text = self.tables()
            (out / "tables.md").write_text(text + "\n")
            self.finished = True
            print(f"\nwritten to {out}/ (preflight.json, *.jsonl, correctness.json, speed.json, memory.json, "
                  f"tables.md)\n\n{text}", flush=True)


# ----------------------------------------------------------------------------- the plan

def plan_rows(device, dry: bool, peaks: dict, state: dict) -> list[Row]:
    """Every row, in the order they run: the questions first (the budget may cut the tail)."""
    cn = compile_needs(device)
    if dry:
        m1028 = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=257, mask_id=256, max_seq_len=128)
        slice8b = ModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=256, vocab_size=1024, mask_id=1000,
                              max_seq_len=128)
        base = dict(seq=128, micro=2, mean_doc=40, steps=1, warmup=1)
    else:
        m1028 = get_preset("1028M")
        slice8b = ModelConfig(**{**get_preset("llada-8b").__dict__, "n_layers": 2})
        base = dict(seq=2048, micro=8, mean_doc=700, steps=6, warmup=3)

    def speed(id_, name, mcfg, backend, compile_, ac, **kw):
        # The trainer's path: on CUDA every native run shards with FSDP2 (a 1-rank mesh here; bf16 parameters
        # gathered per unit, no autocast), so every speed row does too unless it says otherwise.
        kw.setdefault("fsdp", device.type == "cuda")
        spec = SpeedSpec(name, mcfg, backend, compile_, ac, **{**base, **kw})
        needs = list(cn) if compile_ else []
        if backend == "flex":  # flex runs compiled on CUDA whatever the blocks do
            needs += ["flex"] + (list(cn) if device.type == "cuda" else [])
        needs += (["fsdp"] if spec.fsdp else []) + (["float8"] if spec.float8 else [])
        return Row(id_, "speed", speed_fields(spec),
                   lambda: speed_run(device, spec, peaks, dry, overrun=state["overrun"]),
                   needs=tuple(dict.fromkeys(needs)), compiled=compile_, spec=spec)

    def flex_needs(backend):
        return (("flex",) + (cn if device.type == "cuda" else ())) if backend == "flex" else ()

    precision = PrecisionCheck(device, dry)
    rows = [Row("1a.bf16", "precision", {"policy": "bf16 autocast, fp32 weights (1 GPU, TP only)"},
                precision.autocast_row),
            Row("1a.fsdp", "precision", {"policy": "FSDP2 bf16 parameters, fp32 reduce (1-rank group)"},
                precision.fsdp_row, needs=("fsdp",)),
            speed("2.1", "1028M", m1028, "flex", True, "op"),
            speed("2.2", "1028M", m1028, "sdpa", True, "op")]
    if flash_available(device):
        rows.append(speed("2.2f", "1028M", m1028, "flash", True, "op"))
    backends = ["sdpa", "flex"] + (["flash"] if flash_available(device) else [])
    for case_name, case in attention_cases(device, dry).items():
        for backend in backends:
            rows.append(Row(f"1b.{case_name.split()[0]}.{backend}", "attention",
                            {"case": case_name, "backend": backend},
                            (lambda case=case, backend=backend: attention_row(device, case, backend)),
                            needs=flex_needs(backend), compiled=backend == "flex" and device.type == "cuda"))
    rows += [speed("2.3", "1028M", m1028, "flex", True, "none"),
             speed("2.4", "1028M one doc/row", m1028, "auto", True, "op", mean_doc=10 ** 9),
             # On CUDA 2.5 is the old 1-GPU autocast path (no FSDP) for comparison; the CPU dry run, whose other
             # rows skip FSDP, takes the 1-rank FSDP path here instead.
             speed("2.5", "1028M" + (" autocast, no FSDP" if device.type == "cuda" else ""), m1028, "flex", True,
                   "op", fsdp=device.type != "cuda"),
             speed("2.6", "llada-8b 2-layer slice", slice8b, "flex", True, "op", micro=2),
             speed("2.7", "1028M", m1028, "flex", True, "full"),
             speed("2.8", "1028M", m1028, "flex", False, "op"),
             speed("2.9", "1028M", m1028, "sdpa", False, "op"),
             speed("2.10", "1028M float8", m1028, "flex", True, "op", float8=True)]
    for mask_name, factory in KERNEL_MASKS.items():
        for backend in ("flex", "sdpa"):  # (SDPA's dense mask comes from flex's create_mask)
            rows.append(Row(f"2b.{mask_name.split()[0]}.{backend}", "kernels", {"mask": mask_name, "backend": backend},
                            (lambda factory=factory, backend=backend: kernel_run(device, factory, backend, dry)),
                            needs=flex_needs("flex"), compiled=backend == "flex" and device.type == "cuda"))
    return rows


def selected(row_id: str, patterns: Optional[list[str]]) -> bool:
    return not patterns or any(row_id == p or row_id.startswith(p + ".") for p in patterns)


def device_lost(e: BaseException) -> bool:
    """A sticky device error: the CUDA context cannot run anything after it (an out-of-memory is not one)."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, getattr(torch, "AcceleratorError", ())) or any(
        t in text for t in ("CUDA error", "illegal memory access", "device-side assert", "CUDA driver error"))


def reset_between_rows(device) -> None:
    """A clean slate for the next row: no graphs, guards or automatic-dynamic history of the previous
    configurations (later rows would compile dynamic-shape graphs), no cached blocks of freed models."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_rows(rows: list[Row], report: Report, budget: Budget, checks: dict, device, out: Path,
             state: dict) -> None:
    lost = ""
    for row in rows:
        base = {"id": row.id, **row.fields}
        failed = [f"{n}: {checks[n]}" for n in row.needs if checks.get(n)]
        reason = ("skipped: " + "; ".join(failed) if failed else
                  f"skipped: the device failed in an earlier row ({lost})" if lost else budget.refuse(row))
        if reason:
            report.add(row.table, {**base, "skipped": reason})
            if row.spec is not None:
                report.add("memory", {**base, "skipped": reason})
            continue
        print(f"[{elapsed():5.0f}s] {row.id} {row.table}: "
              + " ".join(f"{k}={v}" for k, v in row.fields.items()), flush=True)
        report.current = (row.table, base, row.spec is not None)
        if state["hang"]:  # --force-overrun: this row "hangs" (a compile that never ends) until the alarm
            signal.setitimer(signal.ITIMER_REAL, 2.0)
            while True:
                time.sleep(0.1)
        t0 = time.perf_counter()
        try:
            entry = {**base, **row.run()}
        except Exception as e:  # noqa: BLE001  (one failing row must not hide the others)
            entry = {**base, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            with open(out / "errors.log", "a") as f:
                f.write(f"{row.id} {row.fields}\n{traceback.format_exc()}\n")
            if device_lost(e):
                lost = f"{row.id}: {type(e).__name__}"
        entry["wall_s"] = time.perf_counter() - t0
        budget.record(row, entry["wall_s"])
        report.current = None
        report.add(row.table, entry)
        if row.spec is not None:
            try:
                if "error" in entry:
                    raise RuntimeError("no measurement")
                if checks.get("yaml"):
                    mem = {**base, "skipped": f"skipped: yaml: {checks['yaml']}"}
                else:
                    mem = {**base, **memory_row(row.spec, entry)}
            except Exception as e:  # noqa: BLE001
                mem = {**base, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            report.add("memory", mem)
        if not lost:
            try:
                reset_between_rows(device)
            except Exception as e:  # noqa: BLE001
                lost = f"reset after {row.id}: {type(e).__name__}"


def stop_remaining(rows: list[Row], report: Report, why: str) -> None:
    """At the deadline: the row in progress and every row not yet reported say so."""
    done = {(t, r["id"]) for t, rs in report.rows.items() for r in rs if "id" in r}
    if report.current is not None:
        table, base, has_memory = report.current
        report.add(table, {**base, "skipped": f"interrupted: {why}"})
        if has_memory:
            report.add("memory", {**base, "skipped": f"interrupted: {why}"})
        done.add((table, base["id"]))
        report.current = None
    for row in rows:
        if (row.table, row.id) not in done:
            base = {"id": row.id, **row.fields}
            report.add(row.table, {**base, "skipped": f"skipped: {why}"})
            if row.spec is not None:
                report.add("memory", {**base, "skipped": f"skipped: {why}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (or the GPU, if --device cuda)")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no row that would end after this many seconds (default 300; dry run 120)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop, write everything and exit 0 at this time (default: budget + 120 s)")
    ap.add_argument("--rows", default=None, help="only these rows: comma-separated ids or prefixes (2.1,1b,2b)")
    ap.add_argument("--force-preflight-fail", default="",
                    help="dry-run testing: these pre-flight checks fail (comma-separated: compiler, "
                         "python_headers, triton, compile, flex, yaml, fsdp, float8)")
    ap.add_argument("--force-overrun", action="store_true",
                    help="dry-run testing: the first compiled speed row's warm-up counts as longer than the "
                         "budget, and the next row that starts hangs until the deadline alarm (2 s later)")
    args = ap.parse_args()
    dry = args.dry_run
    device = torch.device(args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not dry:
        sys.exit("no CUDA device: run with --dry-run for the CPU smoke check")
    budget_s = args.budget_s if args.budget_s is not None else (120.0 if dry else 300.0)
    deadline_s = args.deadline_s if args.deadline_s is not None else budget_s + 120.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "errors.log").unlink(missing_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:  # no code generation on CPU: the same tracing, graphs and checkpointing, in seconds
        parallel.COMPILE_BACKEND = "eager"
        attention_module.COMPILE_BACKEND = "eager"
    # Configurations differ (the compiler is reset between rows anyway): keep every graph of a row.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    datasheet, name = datasheet_peak(device)
    meta = {"device": name if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry,
            "peak_datasheet": datasheet, "peak_measured": float("nan"), "flash_attn": flash_available(device),
            "budget_s": budget_s, "deadline_s": deadline_s, "argv": sys.argv[1:]}
    report = Report(out, meta)
    state = {"hang": False, "overrun": lambda: None}

    def on_signal(signum, frame):
        if signum == signal.SIGALRM:
            why = "--force-overrun" if state["hang"] else f"--deadline-s {deadline_s:.0f}"
            report.alarm(f"deadline alarm at {elapsed():.0f} s ({why})")
        else:
            report.alarm(f"{signal.Signals(signum).name} at {elapsed():.0f} s")
    signal.signal(signal.SIGALRM, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline_s - elapsed()))

    rows: list[Row] = []

    def watchdog():  # the main thread is stuck (a hung kernel, a compile that ignores signals): write, exit
        why = f"watchdog: main thread unresponsive 20 s after the deadline ({deadline_s:.0f} s)"
        report.stopping = True
        got = report.lock.acquire(timeout=10)
        try:
            stop_remaining(rows, report, why)
            report.finish(stopped=why)
        finally:
            if got:
                report.lock.release()
            sys.stdout.flush()
            os._exit(0)
    guard = threading.Timer(max(0.0, deadline_s - elapsed()) + 20.0, watchdog)
    guard.daemon = True
    guard.start()

    budget = Budget(budget_s)
    try:
        t = time.perf_counter()
        forced = {n.strip() for n in args.force_preflight_fail.split(",") if n.strip()}
        checks = preflight(device, parallel.COMPILE_BACKEND, forced)
        meta["preflight"], meta["preflight_s"] = checks, time.perf_counter() - t
        (out / "preflight.json").write_text(json.dumps({"checks": checks, "seconds": meta["preflight_s"]}, indent=1))
        print(f"[{elapsed():5.0f}s] pre-flight ({meta['preflight_s']:.1f} s): "
              + ", ".join(f"{k} {'ok' if not v else 'FAILED: ' + v}" for k, v in checks.items()), flush=True)
        try:
            meta["peak_measured"] = measure_matmul_peak(device, torch.bfloat16 if device.type == "cuda" else
                                                        torch.float32, n=8192 if device.type == "cuda" else 512)
        except Exception as e:  # noqa: BLE001
            meta["peak_measured_error"] = f"{type(e).__name__}: {e}"
        peaks = {"datasheet": datasheet if not math.isnan(datasheet) else meta["peak_measured"],
                 "measured": meta["peak_measured"]}

        if args.force_overrun:
            def overrun():
                budget.measured.setdefault(("speed", True), 10 * budget_s)  # as if compiling took that long
                state["hang"] = True  # and the next row to start hangs until the alarm
            state["overrun"] = overrun
        patterns = [p.strip() for p in args.rows.split(",")] if args.rows else None
        rows += [r for r in plan_rows(device, dry, peaks, state) if selected(r.id, patterns)]
        run_rows(rows, report, budget, checks, device, out, state)
        signal.setitimer(signal.ITIMER_REAL, 0)
        report.finish()
    except DeadlineReached as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop_remaining(rows, report, str(e))
        report.finish(stopped=str(e))
    finally:
        guard.cancel()
        if not report.finished:  # an unexpected error outside the rows: still write what exists
            report.finish(stopped="unexpected error (see the traceback)")


if __name__ == "__main__":
    main()
