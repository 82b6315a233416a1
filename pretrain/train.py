"""The training loop: one screen, top to bottom."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from data import Loader, build_data
from model import Transformer, count_params, flops_per_token

from .checkpoint import latest_checkpoint, list_checkpoints, step_of
from .config import Config, ConfigError, save_config, to_dict
from .diffusion import draw_step_noise, get_schedule
from .engine import build_engine
from .flops import peak_flops
from .guard import BadStepGuard
from .metrics import MetricLogger
from .plot import plot_runs
from .parallel import (ParallelDims, build_mesh, cpu_group, dp_coordinates, init_distributed, init_weights,
                       loss_scope, parallelize, uses_fsdp)
from .preemption import Preemption
from .resume import load_resumed, lr_for, plan_resume, record_rollback
from .step import objective_loss, precision_context, train_step  # noqa: F401  (objective_loss: re-exported)


def resolve_model(cfg: Config, data) -> None:
    """Fill the model's vocabulary and mask id from the data, and check that they agree."""
    m = cfg.model
    if m.vocab_size is None:
        m.vocab_size = data.vocab_size
    if m.vocab_size < data.vocab_size:
        raise ConfigError(f"the data's tokenizer has {data.vocab_size} ids but model.vocab_size={m.vocab_size}: "
                          f"raise model.vocab_size (or leave it unset to take it from the data)")
    if m.mask_id is None:
        m.mask_id = data.mask_id
    if m.mask_id != data.mask_id:
        raise ConfigError(f"model.mask_id={m.mask_id} differs from the data's mask id {data.mask_id}")
    cfg.validate()


def build_optimizer(model, ocfg, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_norm_or_emb = p.ndim < 2 or name.startswith("tok_embeddings")
        (no_decay if is_norm_or_emb and not ocfg.decay_norms_and_embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, fused=fused)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def evaluate(model, cfg: Config, source, *, dp_rank: int, dp_size: int, micro: int, device, autocast) -> float:
    """Mean loss over train.eval_batches fixed validation batches with fixed noise (comparable across steps)."""
    model.eval()
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.poly_exponent)
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    loader = Loader(source, seed=0, dp_rank=dp_rank, dp_size=dp_size)
    n = source.num_samples
    batches = cfg.train.eval_batches if n is None else max(1, min(cfg.train.eval_batches, n // G))
    rows = loader.rank_positions(0, G)
    total = torch.zeros((), device=device)
    for i in range(batches):
        noise = draw_step_noise(10_007, i, G, L, stratified=True, random_length_prob=0.0, device=device)
        for m in range(len(rows) // micro):
            x0, doc = loader.micro_batch(i * G, G, micro, m)
            r = rows[m * micro:(m + 1) * micro]
            with loss_scope(cfg.parallel.tp > 1), autocast:
                loss, _ = objective_loss(model, cfg, x0.to(device), doc.to(device) if doc is not None else None,
                                         noise.u[r], noise.mask_uniform[r], schedule)
            total += loss.float() * len(r) / len(rows)
    model.train()
    return float(all_reduce_mean(total / batches))


def train(cfg: Config) -> dict:
    rank, world, device = init_distributed(cfg.train.device, timeout_s=cfg.parallel.timeout_s,
                                           flight_recorder=cfg.parallel.flight_recorder)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        dims = ParallelDims.from_config(cfg.parallel, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mesh = build_mesh(dims, device)
    dp_rank, dp_size = dp_coordinates(mesh, dims)
    G = cfg.train.global_batch_size
    micro = cfg.train.micro_batch_size or G // dp_size
    if G % (micro * dp_size):
        raise ConfigError(f"train.global_batch_size={G} must be a multiple of train.micro_batch_size={micro} x "
                          f"data-parallel degree {dp_size}")
    accum = G // (micro * dp_size)

    data = build_data(cfg.data, cfg.train.seed)
    resolve_model(cfg, data)
    try:
        dims.validate_model(cfg.model, cfg.data.seq_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    fingerprint = getattr(data.info.get("tokenizer"), "fingerprint", None)
    # Before anything is written: stale .tmp cleanup, the checkpoint choice (rank 0, broadcast), a requested
    # rollback, and the config comparison (a fatal change stops here, leaving the run directory as it was).
    plan = plan_resume(cfg, run_dir, group=cpu_group("checkpoint"), fingerprint=fingerprint)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # Evaluation tokenizes with the run's own tokenizer; a run directory holding another one is refused.
        from data.tokenizer import save_run_tokenizer
        save_run_tokenizer(data.info.get("tokenizer"), run_dir)

    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    # One precision policy (pretrain/step.py): FSDP's bf16 parameters without autocast, bf16 autocast
    # without FSDP; DeepSpeed's bf16 mode casts the weights itself. fp32 master weights and loss everywhere.
    precision = precision_context(device, use_bf16, fsdp=uses_fsdp(cfg.parallel, dims, mesh) or
                                  cfg.parallel.engine == "deepspeed")
    autocast = precision()
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_params(model)
    model = parallelize(model, cfg.parallel, dims, mesh, param_dtype=torch.bfloat16 if use_bf16 else None)
    model.to_empty(device=device)
    init_weights(model, seed=cfg.train.seed)  # the same weights under every layout
    if cfg.train.init_from and not plan.candidates:  # a checkpoint of this run to resume wins
        from .convert import ConvertError, load_init_weights
        try:  # continued pretraining: weights only, before the optimizer exists (fresh state, step 0)
            source = load_init_weights(cfg.train.init_from, model, cfg.model)
        except ConvertError as e:
            raise ConfigError(str(e)) from None
        if rank == 0:
            print(f"initialised the weights from {source} (train.init_from; fresh optimizer, step 0)")
    optimizer = build_optimizer(model, cfg.optim)
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.poly_exponent)
    # native: FSDP2/TP + DCP checkpoints; deepspeed: ZeRO + its checkpoints. Same model, loss and loader.
    engine = build_engine(cfg, model, optimizer, ckpt_dir=run_dir / "checkpoints", accum=accum, micro=micro,
                          dp_size=dp_size, use_bf16=use_bf16, process_group=cpu_group("checkpoint"))
    model = engine.model
    if cfg.train.ema_decay > 0:
        engine.attach_ema(cfg.train.ema_decay)  # before the resume, so the checkpoint's EMA loads into it

    step, consumed = 0, 0
    # The first candidate that loads; with resume=auto a corrupt latest checkpoint falls back, loudly.
    resumed = load_resumed(engine, plan, cfg, warn=print if rank == 0 else (lambda *a, **k: None),
                           fingerprint=fingerprint)
    resume_from, saved = resumed.path, resumed.state
    if resume_from is not None:
        step, consumed = saved["step"], saved["consumed"]
    lr_anchor = resumed.anchor  # set when a resume changed the schedule: the LR continues, it does not jump
    guard = BadStepGuard(cfg.train.max_bad_steps, cfg.train.loss_spike_factor, cfg.train.loss_spike_window,
                         state=saved.get("guard"))
    save_estimate = float(saved.get("save_seconds") or 0.0)  # seconds a save takes, for the SIGTERM decision
    loader = Loader(data.train, cfg.train.seed, dp_rank, dp_size)

    L = cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, L, counts["non_embedding"])
    peak, peak_src = peak_flops(device, cfg.train.peak_flops)
    log = MetricLogger(run_dir, rank=rank, wandb_mode=cfg.logging.wandb, project=cfg.logging.project,
                       name=cfg.train.name, config=to_dict(cfg))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"unmask | {data.description}")
    say(f"model {counts['total']:,} params ({counts['non_embedding']:,} non-embedding) | world {world} "
        f"(dp {dp_size}, tp {dims.tp}) | batch {G} x {L} tokens, micro {micro}, accum {accum} | "
        f"{precision_name(use_bf16, precision)} on {device} | peak {peak / 1e9:.0f} GFLOP/s ({peak_src})"
        + (f" | resumed at step {step}" if resume_from else ""))
    if data.true_entropy is not None:
        say(f"true entropy of the data: {data.true_entropy:.4f} nats/token — the loss bounds it from above")
    if plan.rollback:
        target, aside = plan.rollback
        say(f"ROLLBACK to {target.name}: the newer checkpoints were moved to {aside}")
        record_rollback(run_dir, target, aside, log)
    for path, why in resumed.failed:
        log.log({"step": step, "event": "checkpoint_fallback", "skipped_checkpoint": path.name, "reason": why})
    for key, old, new, kind in resumed.changes:
        if kind != "operational":  # how this attempt runs (layout, resume, logging) is not news
            say(f"config change on resume ({kind}): {key}: {old!r} -> {new!r}")
    if resumed.changes:
        log.log({"step": step, "event": "config_change",
                 "changes": {k: [old, new] for k, old, new, _ in resumed.changes}})

    bar = None
    if rank == 0 and cfg.logging.progress_bar and step < cfg.train.steps:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train.steps, initial=step, desc="train", dynamic_ncols=True, leave=False,
                   disable=None)  # None: off when stderr is not a terminal (slurm logs, pipes)
    write = bar.write if bar is not None else say
    val_loss = float("nan")
    window_t, window_tokens, ran = time.perf_counter(), 0, 0
    # SIGUSR1/SIGTERM: save (if it fits in the grace period) and exit for a requeue
    preemption = Preemption(run_dir, rank, group=cpu_group("signals"), grace_s=cfg.train.preempt_grace_s).install()
    preempted = False
    model.train()
    while step < cfg.train.steps:
        lr = lr_for(step, cfg.optim, cfg.train.steps, lr_anchor)
        engine.set_lr(lr)
        result = train_step(engine, cfg, loader, step=step, consumed=consumed, micro=micro, accum=accum, dims=dims,
                            device=device, schedule=schedule, precision=precision, guard=guard,
                            ema=getattr(engine, "ema", None))
        step_loss, grad_norm, length = result.loss, result.grad_norm, result.length
        step += 1
        if result.skipped:  # no update anywhere: weights, optimizer state (and EMA) are as after step - 1
            write(f"step {step:>6} | SKIPPED: {result.skipped} (consecutive {guard.consecutive}, total {guard.total})")
            log.log({"step": step, "event": "bad_step", "skipped": result.skipped, "bad_steps": guard.total})
            guard.check_limit(step, [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")])
        ran += 1
        consumed += G
        window_tokens += G * length
        if bar is not None:
            bar.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            loss_val = float(all_reduce_mean(step_loss))
            gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            elapsed = time.perf_counter() - window_t
            tok_s = window_tokens / elapsed
            mfu = tok_s * flops_tok / (peak * world)
            mem = peak_memory_gib(device)  # this rank's peak since the last log line (CUDA only)
            write(f"step {step:>6}/{cfg.train.steps} | loss {loss_val:.4f} | lr {lr:.2e} | gnorm {gn:.3f} | "
                  f"{tok_s:,.0f} tok/s | mfu {100 * mfu:.1f}%" + (f" | peak mem {mem:.1f} GiB" if mem else ""))
            log.log({"step": step, "loss": loss_val, "lr": lr, "grad_norm": gn, "tokens_per_s": tok_s, "mfu": mfu,
                     "bad_steps": guard.total, "tokens": consumed * L, "time": time.time(),
                     **({"peak_mem_gib": mem} if mem else {})})
            window_t, window_tokens = time.perf_counter(), 0
        # The signal is checked after every step, before evaluation (which a stopping run skips).
        preempted = preemption.requested(save_estimate)
        if (step % cfg.train.eval_every == 0 or step == cfg.train.steps) and not preempted:
            ema = getattr(engine, "ema", None)
            with ema.swapped() if ema is not None else contextlib.nullcontext():  # MDLM validates the EMA
                vals = {name: evaluate(model, cfg, src, dp_rank=dp_rank, dp_size=dp_size, micro=micro,
                                       device=device, autocast=autocast) for name, src in data.valid.items()}
            val_loss = next(iter(vals.values()))
            gap = f" | true entropy {data.true_entropy:.4f} (gap {val_loss - data.true_entropy:+.4f})" \
                if data.true_entropy is not None else ""
            write(f"step {step:>6} | " + ("EMA weights | " if ema is not None else "")
                  + " | ".join(f"{k} loss {v:.4f} (ppl <= {math.exp(min(v, 50)):.2f})" for k, v in vals.items())
                  + gap)
            oracle = {"true_entropy": data.true_entropy} if data.true_entropy is not None else {}
            log.log({"step": step, **{f"val/{k}": v for k, v in vals.items()}, **oracle,
                     "val_weights": "ema" if ema is not None else "raw"})
            window_t = time.perf_counter()
        stop_now = (cfg.train.stop_after and ran >= cfg.train.stop_after) or preempted
        save_now = step % cfg.train.save_every == 0 or step == cfg.train.steps or stop_now
        if save_now and preempted and not preemption.should_save():
            save_now = False  # SIGTERM: a save would not finish before SIGKILL; the previous checkpoint stays latest
        if save_now:
            t0 = time.perf_counter()
            engine.save(step, {"step": step, "consumed": consumed, "seed": cfg.train.seed, "world_size": world,
                               "layout": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard,
                                          "tp": dims.tp}, "config": to_dict(cfg), "lr_anchor": lr_anchor,
                               "guard": guard.state(), "save_seconds": save_estimate,
                               "data_fingerprint": fingerprint}, blocking=bool(stop_now))
            measured = getattr(getattr(engine, "ckpt", None), "last_save_seconds", None)
            save_estimate = measured or time.perf_counter() - t0
            if stop_now or not cfg.parallel.async_save:  # the measured save time sizes the slurm grace period
                write(f"step {step:>6} | checkpoint saved in {save_estimate:.2f} s")
            window_t = time.perf_counter()
        if preempted:
            engine.wait()
            last = latest_checkpoint(run_dir / "checkpoints")
            preemption.mark(saved=save_now, latest=last.name if last else "")
            kept = "checkpoint saved" if save_now else f"no time to save, {last.name if last else 'none'} stays latest"
            write(f"step {step:>6} | signal received: {kept}, exiting for requeue")
        if stop_now:
            break
    engine.wait()
    preemption.restore()
    if bar is not None:
        bar.close()

    samples = []
    if step >= cfg.train.steps and cfg.train.samples and cfg.diffusion.objective == "mdm":
        samples = sample_and_show(model, cfg, data, device, autocast, say)
    log.close()
    if rank == 0 and cfg.logging.plot:
        say(f"loss curves: {plot_runs([run_dir], run_dir / 'loss.png')}")
    return {"step": step, "val_loss": val_loss, "true_entropy": data.true_entropy, "run_dir": str(run_dir),
            "samples": samples, "preempted": preempted}


def peak_memory_gib(device) -> float:
    """Peak allocated CUDA memory since the previous call, in GiB (0 on CPU); resets the counter."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def precision_name(use_bf16: bool, precision) -> str:
    if not use_bf16:
        return "fp32"
    return "bf16 autocast" if precision is not contextlib.nullcontext else "bf16 parameters (FSDP/DeepSpeed)"


def sample_and_show(model, cfg: Config, data, device, autocast, say) -> list[list[int]]:
    from model.sample import generate
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    length = min(cfg.data.seq_len, 64)
    steps = min(cfg.train.sample_steps, length)
    with autocast:
        out = generate(model, None, mask_id=cfg.model.mask_id, gen_length=length, steps=steps,
                       batch_size=cfg.train.samples, generator=gen, temperature=cfg.train.sample_temperature)
    rows = out.tolist()
    say(f"samples ({length} tokens, {steps} steps, temperature {cfg.train.sample_temperature}, "
        "low-confidence remasking):")
    lang = data.info.get("language")
    for row in rows:
        extra = f"  [valid transitions {100 * lang.valid_transition_rate(row):.0f}%]" if lang is not None else ""
        say(f"  {data.decode(row)}{extra}")
    return rows
