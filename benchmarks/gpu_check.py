"""The GPU check: correctness, speed and memory of the training step on one CUDA device, in one run.

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--budget-s 420]
    python benchmarks/gpu_check.py --dry-run        # tiny shapes on CPU: checks that every part runs

Table 1, correctness: bf16 loss and gradients of one GPU (the trainer's precision policy: bf16 autocast
over fp32 master weights; and FSDP2's bf16 parameters on a 1-rank group) against an fp32 reference
(relative errors), and every available attention backend against the dense-mask fp32 reference on packed
and left-padded batches, forward and backward.
Table 2, speed: tokens/s, MFU (datasheet bf16 peak and the measured bf16 matmul peak) and peak memory of the
trainer's own step (pretrain/step.py) for the 1028M preset at seq 2048 with packed documents, per attention
backend, compile off/on, op-level and full activation checkpointing; then a llada-8b-shaped 2-layer slice
(d 4096, vocabulary 126464) for per-layer speed at that width.
Table 3: launch.plan's memory prediction next to the measured peak.

Needs only torch (no flash-attn, deepspeed, lm-eval, datasets, wandb; flash-attn is measured when present).
The batches are built here (random documents packed into rows with document ids), so no data package,
tokenizer or download is involved. Everything is written under --out (JSON per table and tables.md); the
tables are printed last. Configurations that would overrun --budget-s are skipped and say so.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer, count_params, flops_per_token, get_preset  # noqa: E402
from model.attention import AttentionBatch, attention, build_mask, flash_available  # noqa: E402
from model.params import flops_by_term  # noqa: E402
from pretrain import parallel  # noqa: E402
from pretrain.diffusion import get_schedule  # noqa: E402
from pretrain.engine import NativeEngine  # noqa: E402
from pretrain.flops import _CUDA_PEAKS, measure_matmul_peak  # noqa: E402
from pretrain.step import precision_context, train_step  # noqa: E402

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


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


def run_config(mcfg: ModelConfig, *, seq: int, global_batch: int, ce_chunk: int = 4096, eps: float = 1e-3):
    return SimpleNamespace(
        model=mcfg, train=SimpleNamespace(global_batch_size=global_batch, seed=0),
        data=SimpleNamespace(seq_len=seq, random_length_prob=0.0),
        diffusion=SimpleNamespace(objective="mdm", schedule="linear", eps=eps, t_sampling="stratified",
                                  ce_chunk=ce_chunk))


# ----------------------------------------------------------------------------- table 1: correctness

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def precision_check(device, dry: bool) -> list[dict]:
    """bf16 (the trainer's 1-GPU policy, and FSDP2 bf16 parameters on a 1-rank group) against fp32."""
    if dry:
        mcfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=257, mask_id=256, max_seq_len=128)
        B, L = 2, 128
    else:
        mcfg = ModelConfig(dim=1024, n_layers=4, n_heads=16, ffn_dim=4096, vocab_size=32001, mask_id=32000,
                           max_seq_len=2048)
        B, L = 4, 2048
    x, doc = packed_docs(B, L, mcfg.vocab_size, mean_doc=L // 3, seed=1)
    x, doc = x.to(device), doc.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    u = torch.rand(B, generator=g, device=device) * 0.98 + 0.01
    noise = torch.rand(B, L, generator=g, device=device)
    from pretrain.diffusion import mdm_loss
    sched = get_schedule("linear")

    def loss_and_grads(model, ctx):
        model.zero_grad(set_to_none=True)
        with ctx():
            loss, _ = mdm_loss(model, x, u, noise, mask_id=mcfg.mask_id, schedule=sched, eps=1e-3, doc_ids=doc,
                               ce_chunk=4096)
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().float().clone()
                 for n, p in model.named_parameters()}
        return loss.detach().float(), grads

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_cfg = ModelConfig(**{**mcfg.__dict__, "attn_backend": "sdpa"})
    ref = Transformer(ref_cfg).to(device)
    ref.init_weights(seed=0)
    ref_loss, ref_grads = loss_and_grads(ref, precision_context(device, False, fsdp=False))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    rows = []

    def row(name, loss, grads):
        per = {n: rel(grads[n], ref_grads[n]) for n in ref_grads}
        total = float(torch.sqrt(sum((grads[n] - ref_grads[n]).pow(2).sum() for n in ref_grads)) /
                      torch.sqrt(sum(g.pow(2).sum() for g in ref_grads.values())))
        worst = max(per, key=per.get)
        rows.append({"policy": name, "loss_fp32": float(ref_loss), "loss": float(loss),
                     "loss_rel_err": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                     "grad_rel_err": total, "worst_tensor": worst, "worst_tensor_rel_err": per[worst]})

    model = Transformer(mcfg).to(device)
    model.load_state_dict(ref.state_dict())
    row("bf16 autocast, fp32 weights (1 GPU, TP only)", *loss_and_grads(model, precision_context(device, True, False)))
    del model
    try:  # FSDP2's mixed precision on a 1-rank process group: what every data-parallel layout computes
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))
        with torch.device("meta"):
            fsdp_model = Transformer(mcfg)
        parallel.apply_fsdp(fsdp_model, mesh, torch.bfloat16)
        fsdp_model.to_empty(device=device)
        parallel.init_weights(fsdp_model, seed=0)
        row("FSDP2 bf16 parameters, fp32 reduce (data parallel)",
            *loss_and_grads(fsdp_model, precision_context(device, True, fsdp=True)))
        del fsdp_model
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        rows.append({"policy": "FSDP2 bf16 parameters (1-rank group)", "error": f"{type(e).__name__}: {e}"})
    del ref
    return rows


def attention_check(device, dry: bool) -> list[dict]:
    """Every backend available here against the fp32 dense-mask reference, forward and backward."""
    B, H, Hkv, L, D = (2, 4, 2, 64, 16) if dry else (2, 16, 16, 2048, 128)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    docs = packed_docs(B, L, 10, mean_doc=L // 4, seed=2)[1].to(device)
    left = torch.ones(B, L, dtype=torch.bool, device=device)
    left[1, :L // 3] = False
    # A left-padded row is padding then documents; the padding carries the first document's id, so every
    # (ignored) padding query still sees a key: a fully masked query row would put NaN into SDPA's backward.
    left_docs = docs.clone()
    left_docs[1, :L // 3] = left_docs[1, L // 3]
    cases = {"packed": (docs, None), "left_padded": (left_docs, left),
             "one_doc_per_row": (torch.zeros_like(docs), None)}
    backends = ["sdpa", "flex"] + (["flash"] if flash_available(device) else [])
    rows = []
    g = torch.Generator(device=device).manual_seed(3)
    q0, k0, v0 = (torch.randn(B, h, L, D, generator=g, device=device) for h in (H, Hkv, Hkv))
    for case, (doc, keep) in cases.items():
        real = keep if keep is not None else torch.ones(B, L, dtype=torch.bool, device=device)
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        mask = build_mask(doc, keep, False, L, L, device)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                             attn_mask=mask)
        ref_sel = ref.transpose(1, 2)[real]
        ref_grads = torch.autograd.grad(ref_sel.float().pow(2).sum(), (q, k, v))
        for backend in backends:
            entry = {"case": case, "backend": backend}
            try:
                no_backward = device.type == "cpu" and backend == "flex"  # no CPU backward (torch 2.13)
                qb, kb, vb = (t.detach().to(dtype).requires_grad_(not no_backward) for t in (q0, k0, v0))
                batch = AttentionBatch.build(doc, keep, causal=False, backend=backend, seq_len=L, device=device,
                                             dtype=dtype)
                entry["path"] = batch.backend + (" (unmasked)" if batch.mask is None and batch.block_mask is None
                                                 and batch.varlen is None else "")
                out = attention(qb, kb, vb, causal=False, batch=batch)
                sel = out.transpose(1, 2)[real]
                entry["fwd_rel_err"] = rel(sel, ref_sel)
                if no_backward:
                    entry["bwd_rel_err"] = None
                else:
                    grads = torch.autograd.grad(sel.float().pow(2).sum(), (qb, kb, vb))
                    entry["bwd_rel_err"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(entry)
    return rows


# ----------------------------------------------------------------------------- table 2: speed

def datasheet_peak(device) -> tuple[float, str]:
    if device.type != "cuda":
        return float("nan"), "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, value in _CUDA_PEAKS.items():
        if key in name:
            return value, name
    return float("nan"), name


def float8_ready(device) -> str:
    """'' when float8 training can run here, else why not."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "no float8 tensor cores"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao not installed"
    return ""


def speed_run(device, mcfg: ModelConfig, *, name: str, backend: str, compile_: bool, ac: str, seq: int, micro: int,
              mean_doc: int, steps: int, warmup: int, peaks: dict, float8: bool = False) -> dict:
    mcfg = ModelConfig(**{**mcfg.__dict__, "attn_backend": backend})
    entry = {"config": name, "backend": backend, "compile": compile_, "ac": ac, "seq": seq, "micro": micro,
             "packed": mean_doc < seq}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device("meta"):
        model = Transformer(mcfg)
    counts = count_params(model)
    if float8:
        parallel.apply_float8(model)
    parallel.apply_ac(model, ac)
    if compile_:
        parallel.apply_compile(model)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    engine = NativeEngine(model, optimizer, grad_clip=1.0, accum=1, checkpointer=None)
    cfg = run_config(mcfg, seq=seq, global_batch=micro)
    source = BatchSource(micro, seq, mcfg.vocab_size, mean_doc)
    precision = precision_context(device, device.type == "cuda", fsdp=False)
    dims = parallel.ParallelDims(1, 1, 1, 1)
    schedule = get_schedule("linear")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t_first = time.perf_counter()
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        result = train_step(engine, cfg, source, step=i, consumed=0, micro=micro, accum=1, dims=dims, device=device,
                            schedule=schedule, precision=precision)
        float(result.loss)  # a host sync, as the trainer's logging does
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if i == warmup - 1:
            entry["warmup_s"] = time.perf_counter() - t_first
    med = sorted(times)[len(times) // 2]
    tokens = micro * seq
    fpt = flops_per_token(mcfg, seq, counts["non_embedding"])
    honest = flops_by_term(mcfg, seq, counts["non_embedding"], head_fraction=0.5 + 0.5e-3)["total"]
    entry.update({"step_s": med, "tokens_per_s": tokens / med, "flops_per_token": fpt,
                  "mfu_datasheet": tokens * fpt / med / peaks["datasheet"],
                  "mfu_measured_peak": tokens * fpt / med / peaks["measured"],
                  "mfu_datasheet_masked_head": tokens * honest / med / peaks["datasheet"],
                  "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                  "loss": float(result.loss), "params": counts["total"]})
    del model, optimizer, engine
    return entry


def speed_plan(device, dry: bool) -> list[dict]:
    """The configurations of table 2, most important first (the budget may cut the tail)."""
    if dry:
        m1028 = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=257, mask_id=256, max_seq_len=128)
        slice8b = ModelConfig(dim=128, n_layers=2, n_heads=4, ffn_dim=256, vocab_size=1024, mask_id=1000,
                              max_seq_len=128)
        base = {"seq": 128, "micro": 2, "mean_doc": 40, "steps": 1, "warmup": 1}
        backends = ["sdpa"]
        compiles = [False]
    else:
        m1028 = get_preset("1028M")
        slice8b = ModelConfig(**{**get_preset("llada-8b").__dict__, "n_layers": 2})
        base = {"seq": 2048, "micro": 8, "mean_doc": 700, "steps": 6, "warmup": 3}
        backends = ["flex", "sdpa"] + (["flash"] if flash_available(device) else [])
        compiles = [True, False]
    first, c0 = backends[0], compiles[0]
    slice_base = {**base, "micro": 2} if not dry else base
    # Most important first: the budget may cut the tail.
    plan = [dict(name="1028M", mcfg=m1028, backend=first, compile_=c0, ac="op", **base),
            dict(name="llada-8b 2-layer slice", mcfg=slice8b, backend=first, compile_=c0, ac="op", **slice_base)]
    if not dry:
        plan.append(dict(name="1028M one doc/row", mcfg=m1028, backend="auto", compile_=c0, ac="op",
                         **{**base, "mean_doc": 10 ** 9}))
        plan.append(dict(name="1028M float8", mcfg=m1028, backend=first, compile_=c0, ac="op", float8=True, **base))
        for compile_ in compiles:
            for backend in backends:
                if (backend, compile_) != (first, c0):
                    plan.append(dict(name="1028M", mcfg=m1028, backend=backend, compile_=compile_, ac="op", **base))
        plan.append(dict(name="1028M", mcfg=m1028, backend=first, compile_=c0, ac="full", **base))
    return plan


# ----------------------------------------------------------------------------- table 3: memory

def memory_rows(speed: list[dict]) -> list[dict]:
    rows = []
    try:
        from launch.plan import Layout, plan
    except Exception as e:  # noqa: BLE001
        return [{"error": f"launch.plan unavailable: {type(e).__name__}: {e}"}]
    for s in speed:
        if "step_s" not in s:
            continue
        mcfg = s["mcfg_obj"]
        mask = "none" if not s["packed"] else {"sdpa": "dense", "flex": "flex", "flash": "varlen"}.get(
            s.get("path", s["backend"]), "flex")
        try:
            p = plan(mcfg, Layout(1, 1), seq_len=s["seq"], global_batch=s["micro"], micro=s["micro"], ac=s["ac"],
                     ac_every=2, gpu_gib=141.0, ce_chunk=4096, attn_mask=mask)
            rows.append({"config": s["config"], "backend": s["backend"], "compile": s["compile"], "ac": s["ac"],
                         "predicted_gib": p["total"] / 2**30, "measured_gib": s["peak_mem_gib"]})
        except Exception as e:  # noqa: BLE001
            rows.append({"config": s["config"], "error": f"{type(e).__name__}: {e}"})
    return rows


# ----------------------------------------------------------------------------- output

def fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def tables(meta: dict, precision: list, attn: list, speed: list, memory: list) -> str:
    out = [f"GPU check: {meta['device']} | torch {meta['torch']} | CUDA {meta['cuda']} | {meta['date']} | "
           f"{meta['elapsed_s']:.0f} s" + (" | DRY RUN (CPU, tiny shapes)" if meta["dry_run"] else ""),
           f"peaks: datasheet bf16 {fmt(meta['peak_datasheet'] / 1e12, '.4g')} TFLOP/s, measured matmul "
           f"{fmt(meta['peak_measured'] / 1e12, '.4g')} TFLOP/s (bf16 on CUDA, fp32 on CPU); flash-attn "
           f"{'installed' if meta['flash_attn'] else 'not installed'}", "",
           "Table 1a: precision (relative error against fp32)", "",
           "| policy | loss fp32 | loss | loss rel err | grad rel err (global) | worst tensor (rel err) |",
           "|---|---|---|---|---|---|"]
    for r in precision:
        if "error" in r:
            out.append(f"| {r['policy']} | error: {r['error']} | | | | |")
        else:
            out.append(f"| {r['policy']} | {r['loss_fp32']:.5f} | {r['loss']:.5f} | {fmt(r['loss_rel_err'])} | "
                       f"{fmt(r['grad_rel_err'])} | {r['worst_tensor']} ({fmt(r['worst_tensor_rel_err'])}) |")
    out += ["", "Table 1b: attention backends against the fp32 dense-mask reference (real query rows)", "",
            "| batch | backend | path taken | forward rel err | backward rel err |", "|---|---|---|---|---|"]
    for r in attn:
        if "error" in r:
            out.append(f"| {r['case']} | {r['backend']} | error: {r['error']} | | |")
        else:
            out.append(f"| {r['case']} | {r['backend']} | {r['path']} | {fmt(r['fwd_rel_err'])} | "
                       f"{fmt(r['bwd_rel_err']) if r['bwd_rel_err'] is not None else 'n/a (no CPU backward)'} |")
    out += ["", "Table 2: speed of the trainer's step (bf16, one device)", "",
            "| model | backend | compile | AC | seq x micro | tokens/s | MFU datasheet | MFU measured peak | "
            "MFU datasheet, head at masked only | peak mem GiB | warm-up s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in speed:
        head = f"| {r['config']} | {r['backend']} | {'on' if r['compile'] else 'off'} | {r['ac']} | {r['seq']} x {r['micro']} |"
        if "step_s" in r:
            out.append(f"{head} {r['tokens_per_s']:,.0f} | {100 * r['mfu_datasheet']:.1f}% | "
                       f"{100 * r['mfu_measured_peak']:.1f}% | {100 * r['mfu_datasheet_masked_head']:.1f}% | "
                       f"{fmt(r['peak_mem_gib'], '.1f')} | {fmt(r.get('warmup_s'), '.0f')} |")
        else:
            out.append(f"{head} {r.get('skipped') or r.get('error')} | | | | | |")
    out += ["", "Table 3: launch.plan's prediction against the measured peak (one device)", "",
            "| model | backend | compile | AC | predicted GiB | measured GiB |", "|---|---|---|---|---|---|"]
    for r in memory:
        if "error" in r:
            out.append(f"| {r.get('config', '-')} | error: {r['error']} | | | | |")
        else:
            out.append(f"| {r['config']} | {r['backend']} | {'on' if r['compile'] else 'off'} | {r['ac']} | "
                       f"{r['predicted_gib']:.1f} | {fmt(r['measured_gib'], '.1f')} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (or the GPU, if --device cuda)")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --dry-run)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting speed runs after this long")
    args = ap.parse_args()
    dry = args.dry_run
    device = torch.device(args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not dry:
        sys.exit("no CUDA device: run with --dry-run for the CPU smoke check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # Every configuration builds a new model: let dynamo keep all their graphs instead of falling back to eager
    # after its default 8 recompilations of Block.forward.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    datasheet, name = datasheet_peak(device)
    measured = measure_matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                   n=8192 if device.type == "cuda" else 512)
    peaks = {"datasheet": datasheet if not math.isnan(datasheet) else measured, "measured": measured}
    meta = {"device": name if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry,
            "peak_datasheet": datasheet, "peak_measured": measured, "flash_attn": flash_available(device)}

    print(f"[{elapsed():5.0f}s] table 1: precision", flush=True)
    precision = precision_check(device, dry)
    print(f"[{elapsed():5.0f}s] table 1: attention backends", flush=True)
    attn = attention_check(device, dry)
    (out / "correctness.json").write_text(json.dumps({"precision": precision, "attention": attn}, indent=1))

    speed = []
    for spec in speed_plan(device, dry):
        row = {"config": spec["name"], "backend": spec["backend"], "compile": spec["compile_"], "ac": spec["ac"],
               "seq": spec["seq"], "micro": spec["micro"], "packed": spec["mean_doc"] < spec["seq"]}
        if elapsed() > args.budget_s:
            row["skipped"] = f"skipped (time budget {args.budget_s:.0f} s)"
            speed.append(row)
            continue
        if spec.get("float8") and float8_ready(device):
            row["skipped"] = f"skipped (float8: {float8_ready(device)})"
            speed.append(row)
            continue
        print(f"[{elapsed():5.0f}s] table 2: {spec['name']} {spec['backend']} compile={spec['compile_']} "
              f"ac={spec['ac']}", flush=True)
        try:
            row = speed_run(device, spec["mcfg"], name=spec["name"], backend=spec["backend"], compile_=spec["compile_"],
                            ac=spec["ac"], seq=spec["seq"], micro=spec["micro"], mean_doc=spec["mean_doc"],
                            steps=spec["steps"], warmup=spec["warmup"], peaks=peaks, float8=spec.get("float8", False))
        except Exception as e:  # noqa: BLE001  (one failing configuration must not hide the others)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            (out / "errors.log").open("a").write(f"{spec['name']} {spec['backend']}\n{traceback.format_exc()}\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["mcfg_obj"] = spec["mcfg"]
        speed.append(row)
    memory = memory_rows(speed)
    for row in speed:
        row.pop("mcfg_obj", None)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "rows": speed}, indent=1))
    (out / "memory.json").write_text(json.dumps(memory, indent=1))
    meta["elapsed_s"] = elapsed()
    text = tables(meta, precision, attn, speed, memory)
    (out / "tables.md").write_text(text)
    print(f"\nwritten to {out}/ (correctness.json, speed.json, memory.json, tables.md)\n")
    print(text)


if __name__ == "__main__":
    main()
