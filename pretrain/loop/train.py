"""The training loop: `setup` builds everything, `train` runs the steps, one screen, top to bottom.

The loop body calls one helper per concern: `train_step` (pretrain/loop/step.py), `log_step`, `validate`,
`save_checkpoint`, `leave_for_requeue`; `finish` samples, plots and returns the run's summary.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from data import Loader, build_data
from model import Transformer, count_params, flops_per_token
from model.objectives import Objective, build_objective

from ..checkpoint.resume import ResumePlan, Resumed, load_resumed, plan_resume, record_rollback
from ..checkpoint.store import latest_checkpoint, list_checkpoints, step_of
from ..checkpoint.weights import load_init_weights
from ..config import Config, ConfigError, save_config, to_dict
from ..engines.native import build_engine
from ..engines.parallel import (ParallelDims, build_mesh, cpu_group, dp_coordinates, init_distributed, init_weights,
                                lower_timeouts, parallelize, uses_fsdp)
from ..plot import plot_runs
from .evaluate import evaluate, search_variants
from .flops import peak_flops
from .guard import BadStepGuard
from .lr import continue_schedule, lr_for
from .metrics import MetricLogger, all_reduce_mean
from .preemption import Preemption
from .step import StepResult, precision_context, train_step


def train(cfg: Config) -> dict:
    run = setup(cfg)
    announce(run)
    bar = progress_bar(run)
    write = bar.write if bar is not None else run.say
    # SIGUSR1/SIGTERM: save (if it fits in the grace period) and exit for a requeue
    preemption = Preemption(run.run_dir, run.rank, group=cpu_group("signals"),
                            grace_s=cfg.train.preempt_grace_s).install()
    window = Throughput()
    val_loss, preempted, ran = float("nan"), False, 0
    collector = Collector(cfg.train.gc_every)
    check_every = cfg.train.preempt_check_every or (10 if run.device.type == "cuda" else 1)
    try:  # an exception must not leave the signal handlers (or GC off) in the caller's process
        run.model.train()
        while run.step < cfg.train.steps:
            lr = lr_for(run.step, cfg.optim, cfg.train.steps, run.lr_anchor)
            run.engine.set_lr(lr)
            result = train_step(run.engine, cfg, run.loader, step=run.step, consumed=run.consumed, micro=run.micro,
                                accum=run.accum, dims=run.dims, device=run.device, objective=run.objective,
                                precision=run.precision, guard=run.guard, ema=getattr(run.engine, "ema", None))
            run.step += 1
            ran += 1
            if ran == 1:  # start-up (compilation, loading) is over: a hung collective now fails within minutes
                lower_timeouts(cfg.parallel.step_timeout_s, run.mesh)
            collector.step(run.step)
            if result.skipped:  # no update anywhere: weights, optimizer state (and EMA) are as after step - 1
                report_skip(run, result, write)
            run.consumed += cfg.train.global_batch_size
            window.tokens += cfg.train.global_batch_size * result.length
            if bar is not None:
                bar.update(1)

            if due(run.step, cfg.train.log_every, cfg.train.steps):
                log_step(run, result, lr, window, write)
            # Pending signals are agreed on every check_every steps and always before an evaluation (which a stopping
            # run skips) or a save: every rank counts the same steps, so all of them take part.
            if run.step % check_every == 0 or any(due(run.step, every, cfg.train.steps) for every in
                                                   (cfg.train.eval_every, cfg.train.save_every)):
                preempted = preemption.requested(run.save_estimate)
            if due(run.step, cfg.train.eval_every, cfg.train.steps) and not preempted:
                val_loss = validate(run, write)
                window.restart()
            stop_now = bool(cfg.train.stop_after and ran >= cfg.train.stop_after) or preempted
            save_now = due(run.step, cfg.train.save_every, cfg.train.steps) or stop_now
            if save_now and preempted and not preemption.should_save():
                save_now = False  # SIGTERM: a save would not end before SIGKILL; the previous checkpoint stays latest
            if save_now:
                save_checkpoint(run, blocking=stop_now, write=write)
                window.restart()
            if preempted:
                leave_for_requeue(run, preemption, saved=save_now, write=write)
            if stop_now:
                break
        run.engine.wait()
    finally:
        preemption.restore()
        collector.close()
    if bar is not None:
        bar.close()
    return finish(run, val_loss, preempted)


# ----------------------------------------------------------------------------- setup

@dataclass
class Run:
    """Everything the loop works with, built by setup() before the first step; step and consumed advance."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    dims: ParallelDims
    mesh: Any  # the device mesh (None: one process without a process group)
    dp_rank: int
    dp_size: int
    micro: int
    accum: int
    data: Any  # data.DataBundle
    run_dir: Path
    fingerprint: Optional[str]
    plan: ResumePlan
    use_bf16: bool
    precision: Callable[[], contextlib.AbstractContextManager]  # a fresh precision context per use
    autocast: contextlib.AbstractContextManager  # one precision() context, for validation and samples
    model: torch.nn.Module  # what the forward runs through (engine.model)
    counts: dict  # parameter counts
    engine: Any  # NativeEngine or DeepSpeedEngine
    objective: Objective  # the probabilistic model around the network (model/objectives)
    resumed: Resumed
    guard: BadStepGuard
    loader: Loader
    flops_per_token: float
    peak: tuple[float, str]  # peak FLOP/s per device, and where the number comes from
    log: MetricLogger
    say: Callable[..., None]  # print on rank 0, nothing elsewhere
    step: int = 0
    consumed: int = 0  # samples of the global order trained on: the loader's whole state
    lr_anchor: Optional[dict] = None  # set when a resume changed the schedule: the LR continues, it does not jump
    save_estimate: float = 0.0  # seconds a save takes, for the SIGTERM decision


def setup(cfg: Config) -> Run:
    """Process group, layout, data, run directory, model, optimizer, engine and the resumed state: everything
    before the first step, in this order (a fatal config change on resume stops before anything is written)."""
    native = cfg.parallel.engine == "native"  # (None: a 1-rank group on CUDA, for FSDP's one precision path)
    rank, world, device = init_distributed(cfg.train.device, timeout_s=cfg.parallel.timeout_s,
                                           flight_recorder=cfg.parallel.flight_recorder,
                                           one_rank_group=(True if cfg.parallel.fsdp_one_rank else None) if native
                                           else False)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dims, mesh, dp_rank, dp_size, micro, accum = layout(cfg, world, device)
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
        write_run_dir(cfg, run_dir, data)

    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    # One precision policy (pretrain/loop/step.py): FSDP's bf16 parameters without autocast, bf16 autocast
    # without FSDP; DeepSpeed's bf16 mode casts the weights itself. fp32 master weights and loss everywhere.
    precision = precision_context(device, use_bf16, fsdp=uses_fsdp(cfg.parallel, dims, mesh) or
                                  cfg.parallel.engine == "deepspeed")
    autocast = precision()
    model, counts = build_model(cfg, dims, mesh, device, use_bf16)
    if cfg.train.init_from and not plan.candidates:  # a checkpoint of this run to resume wins
        # continued pretraining: weights only, before the optimizer exists (fresh state, step 0)
        source = load_init_weights(cfg.train.init_from, model, cfg.model)
        if rank == 0:
            print(f"initialised the weights from {source} (train.init_from; fresh optimizer, step 0)")
    objective = build_objective(cfg.diffusion, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size)
    objective.init_modules(model)  # binds the objective to the parameters build_model attached (genmd4)
    # Fused AdamW on CUDA (one kernel per parameter group; DTensor parameters too), the default elsewhere.
    optimizer = build_optimizer(model, cfg.optim, fused=True if device.type == "cuda" else None,
                                no_decay_prefixes=objective.no_decay_prefixes)
    # native: FSDP2/TP + DCP checkpoints; deepspeed: ZeRO + its checkpoints. Same model, loss and loader.
    engine = build_engine(cfg, model, optimizer, ckpt_dir=run_dir / "checkpoints", accum=accum, micro=micro,
                          dp_size=dp_size, use_bf16=use_bf16, process_group=cpu_group("checkpoint"))
    if cfg.train.ema_decay > 0:
        engine.attach_ema(cfg.train.ema_decay)  # before the resume, so the checkpoint's EMA loads into it

    # The first candidate that loads; with resume=auto a corrupt latest checkpoint falls back, loudly.
    resumed = load_resumed(engine, plan, cfg, warn=print if rank == 0 else (lambda *a, **k: None),
                           fingerprint=fingerprint)
    saved = resumed.state
    guard = BadStepGuard(cfg.train.max_bad_steps, cfg.train.loss_spike_factor, cfg.train.loss_spike_window,
                         state=saved.get("guard"))
    loader = Loader(data.train, cfg.train.seed, dp_rank, dp_size)
    run = Run(cfg=cfg, rank=rank, world=world, device=device, dims=dims, mesh=mesh, dp_rank=dp_rank, dp_size=dp_size,
              micro=micro, accum=accum, data=data, run_dir=run_dir, fingerprint=fingerprint, plan=plan,
              use_bf16=use_bf16, precision=precision, autocast=autocast, model=engine.model, counts=counts,
              engine=engine, objective=objective, resumed=resumed, guard=guard, loader=loader,
              save_estimate=float(saved.get("save_seconds") or 0.0),
              flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len, counts["non_embedding"]),
              peak=peak_flops(device, cfg.train.peak_flops),
              log=MetricLogger(run_dir, rank=rank, wandb_mode=cfg.logging.wandb, project=cfg.logging.project,
                               name=cfg.train.name, config=to_dict(cfg)),
              say=print if rank == 0 else (lambda *a, **k: None))
    if resumed.path is not None:
        run.step, run.consumed = saved["step"], saved["consumed"]
        objective.load_state(saved.get("objective") or {})  # e.g. block diffusion's adopted noise interval
        run.lr_anchor = continue_schedule(saved.get("config", {}), cfg, saved["step"], saved.get("lr_anchor"))
    return run


def layout(cfg: Config, world: int, device) -> tuple:
    """(dims, mesh, dp_rank, dp_size, micro-batch size, accumulation steps) of this run on `world` ranks."""
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
    return dims, mesh, dp_rank, dp_size, micro, G // (micro * dp_size)


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


def write_run_dir(cfg: Config, run_dir: Path, data) -> None:
    """Rank 0: the run directory with its config.yaml and tokenizer."""
    from data.tokenizer import save_run_tokenizer
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    # Evaluation tokenizes with the run's own tokenizer; a run directory holding another one is refused.
    save_run_tokenizer(data.info.get("tokenizer"), run_dir)


def build_model(cfg: Config, dims: ParallelDims, mesh, device, use_bf16: bool) -> tuple[torch.nn.Module, dict]:
    """(the parallelized model with its initial weights on `device`, its parameter counts)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
        # An objective's own learned parameters (genmd4's exponents) join the model before it is parallelized.
        build_objective(cfg.diffusion, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size).init_modules(model)
    counts = count_params(model)
    model = parallelize(model, cfg.parallel, dims, mesh, param_dtype=torch.bfloat16 if use_bf16 else None)
    model.to_empty(device=device)
    init_weights(model, seed=cfg.train.seed)  # the same weights under every layout
    return model, counts


def build_optimizer(model, ocfg, fused: Optional[bool] = None, no_decay_prefixes: tuple = ()) -> torch.optim.Optimizer:
    """AdamW; norms and embeddings undecayed unless optim.decay_norms_and_embeddings, and the objective's own
    parameters (`Objective.no_decay_prefixes`, e.g. genmd4's exponents) never decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_norm_or_emb = p.ndim < 2 or name.startswith("tok_embeddings")
        never = bool(no_decay_prefixes) and name.startswith(tuple(no_decay_prefixes))
        (no_decay if never or (is_norm_or_emb and not ocfg.decay_norms_and_embeddings) else decay).append(p)
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, fused=fused)


# ----------------------------------------------------------------------------- what the loop calls

def announce(run: Run) -> None:
    """The run's first lines: data, model, layout, resume; rollbacks, fallbacks and config changes logged."""
    cfg, say, log, resumed = run.cfg, run.say, run.log, run.resumed
    data, counts, (peak, peak_src) = run.data, run.counts, run.peak
    say(f"unmask | {data.description}")
    say(f"model {counts['total']:,} params ({counts['non_embedding']:,} non-embedding) | world {run.world} "
        f"(dp {run.dp_size}, tp {run.dims.tp}) | batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, "
        f"micro {run.micro}, accum {run.accum} | {precision_name(run.use_bf16, run.precision)} on {run.device} | "
        f"peak {peak / 1e9:.0f} GFLOP/s ({peak_src})" + (f" | resumed at step {run.step}" if resumed.path else ""))
    if true_entropy(data, run.objective) is not None:
        say(f"true entropy of the data: {true_entropy(data, run.objective):.4f} nats/token — the loss bounds it "
            f"from above" + (" (AR scores tokens 2..L: the entropy rate)" if run.objective.causal else ""))
    if run.plan.rollback:
        target, aside = run.plan.rollback
        say(f"ROLLBACK to {target.name}: the newer checkpoints were moved to {aside}")
        record_rollback(run.run_dir, target, aside, log)
    for path, why in resumed.failed:
        log.log({"step": run.step, "event": "checkpoint_fallback", "skipped_checkpoint": path.name, "reason": why})
    for key, old, new, kind in resumed.changes:
        if kind != "operational":  # how this attempt runs (layout, resume, logging) is not news
            say(f"config change on resume ({kind}): {key}: {old!r} -> {new!r}")
    if resumed.changes:
        log.log({"step": run.step, "event": "config_change",
                 "changes": {k: [old, new] for k, old, new, _ in resumed.changes}})


def progress_bar(run: Run):
    """A tqdm bar on rank 0 when configured (None otherwise): off when stderr is not a terminal."""
    if run.rank != 0 or not run.cfg.logging.progress_bar or run.step >= run.cfg.train.steps:
        return None
    from tqdm import tqdm
    return tqdm(total=run.cfg.train.steps, initial=run.step, desc="train", dynamic_ncols=True, leave=False,
                disable=None)  # None: off when stderr is not a terminal (slurm logs, pipes)


def due(step: int, every: int, steps: int) -> bool:
    """Whether a periodic action (log, validation, save) falls on `step`: every `every` steps, and at the end."""
    return step % every == 0 or step == steps


class Collector:
    """Python's garbage collector at fixed steps instead of whenever allocations trigger it: an automatic
    collection on one rank at a random moment stalls every rank at the next collective (torchtitan does the
    same). Automatic collection comes back when the loop ends."""

    def __init__(self, every: int):
        self.every = every
        self.was_enabled = gc.isenabled()
        if every > 0:
            gc.disable()
            gc.collect(1)

    def step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.every > 0 and self.was_enabled:
            gc.enable()


@dataclass
class Throughput:
    """Tokens trained since the last log line and the time they took (validation and saves restart the clock)."""
    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def restart(self) -> None:
        self.start = time.perf_counter()

    def take(self) -> float:
        """Tokens per second of this window; the next window starts now."""
        rate = self.tokens / (time.perf_counter() - self.start)
        self.start, self.tokens = time.perf_counter(), 0
        return rate


def report_skip(run: Run, result: StepResult, write) -> None:
    """A step the bad-step guard skipped: said, logged, and the run stopped after too many in a row."""
    guard = run.guard
    write(f"step {run.step:>6} | SKIPPED: {result.skipped} (consecutive {guard.consecutive}, total {guard.total})")
    run.log.log({"step": run.step, "event": "bad_step", "skipped": result.skipped, "bad_steps": guard.total})
    guard.check_limit(run.step, [step_of(p) for p in list_checkpoints(run.run_dir / "checkpoints")])


def log_step(run: Run, result: StepResult, lr: float, window: Throughput, write) -> None:
    """The step line and record: loss (mean over ranks; the NELBO where the objective differentiates a
    surrogate), LR, gradient norm, throughput, MFU, peak memory, and the objective's `logged_stats`."""
    cfg, step = run.cfg, run.step
    loss_val = float(all_reduce_mean(result.loss))
    grad_norm = result.grad_norm
    gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    tok_s = window.take()
    mfu = tok_s * run.flops_per_token / (run.peak[0] * run.world)
    mem = peak_memory_gib(run.device)  # this rank's peak since the last log line (CUDA only)
    # The objective's own statistics (genmd4: w_min/w_mean/w_max of its learned exponents, the same on every rank)
    extra = {k: float(result.stats[k]) for k in run.objective.logged_stats if k in result.stats}
    write(f"step {step:>6}/{cfg.train.steps} | loss {loss_val:.4f} | lr {lr:.2e} | gnorm {gn:.3f} | "
          f"{tok_s:,.0f} tok/s | mfu {100 * mfu:.1f}%" + (f" | peak mem {mem:.1f} GiB" if mem else "")
          + "".join(f" | {k} {v:.3f}" for k, v in extra.items()))
    run.log.log({"step": step, "loss": loss_val, "lr": lr, "grad_norm": gn, "tokens_per_s": tok_s, "mfu": mfu,
                 "bad_steps": run.guard.total, "tokens": run.consumed * cfg.data.seq_len, "time": time.time(),
                 **({"peak_mem_gib": mem} if mem else {}), **extra})


def validate(run: Run, write) -> float:
    """Validation loss on every validation set (the EMA weights when there are, as MDLM validates); returns the
    first set's."""
    cfg, data, ema = run.cfg, run.data, getattr(run.engine, "ema", None)
    with ema.swapped() if ema is not None else contextlib.nullcontext():
        vals = {name: evaluate(run.model, cfg, src, dp_rank=run.dp_rank, dp_size=run.dp_size, micro=run.micro,
                               device=run.device, autocast=run.autocast, objective=run.objective)
                for name, src in data.valid.items()}
        # An objective whose training noise is chosen here (block diffusion's clipped interval): on the first
        # validation set, after the bound (logged above with the objective's unbiased noise).
        adopted = search_variants(run.model, cfg, next(iter(data.valid.values())), dp_rank=run.dp_rank,
                                  dp_size=run.dp_size, micro=run.micro, device=run.device, autocast=run.autocast,
                                  objective=run.objective)
    val_loss = next(iter(vals.values()))
    H = true_entropy(data, run.objective)
    gap = f" | true entropy {H:.4f} (gap {val_loss - H:+.4f})" if H is not None else ""
    write(f"step {run.step:>6} | " + ("EMA weights | " if ema is not None else "")
          + " | ".join(f"{k} loss {v:.4f} (ppl <= {math.exp(min(v, 50)):.2f})" for k, v in vals.items()) + gap)
    if adopted:
        write(f"step {run.step:>6} | training noise adopted (least loss variance): "
              + ", ".join(f"{k} {v:.4g}" for k, v in adopted.items()))
    oracle = {"true_entropy": H} if H is not None else {}
    run.log.log({"step": run.step, **{f"val/{k}": v for k, v in vals.items()}, **oracle,
                 "val_weights": "ema" if ema is not None else "raw", **adopted})
    return val_loss


def save_checkpoint(run: Run, *, blocking: bool, write) -> None:
    """A checkpoint of this step, with the trainer state that makes the resume exact; measures the save."""
    cfg, dims, step = run.cfg, run.dims, run.step
    t0 = time.perf_counter()
    run.engine.save(step, {"step": step, "consumed": run.consumed, "seed": cfg.train.seed, "world_size": run.world,
                           "layout": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp},
                           "config": to_dict(cfg), "lr_anchor": run.lr_anchor, "guard": run.guard.state(),
                           "save_seconds": run.save_estimate, "data_fingerprint": run.fingerprint,
                           "objective": run.objective.state()},
                    blocking=blocking)
    measured = getattr(getattr(run.engine, "ckpt", None), "last_save_seconds", None)
    run.save_estimate = measured or time.perf_counter() - t0
    if blocking or not cfg.parallel.async_save:  # the measured save time sizes the slurm grace period
        write(f"step {step:>6} | checkpoint saved in {run.save_estimate:.2f} s")


def leave_for_requeue(run: Run, preemption: Preemption, *, saved: bool, write) -> None:
    """After a signal: wait for the save, mark the run preempted (the sbatch script requeues it), say so."""
    run.engine.wait()
    last = latest_checkpoint(run.run_dir / "checkpoints")
    preemption.mark(saved=saved, latest=last.name if last else "")
    kept = "checkpoint saved" if saved else f"no time to save, {last.name if last else 'none'} stays latest"
    write(f"step {run.step:>6} | signal received: {kept}, exiting for requeue")


def finish(run: Run, val_loss: float, preempted: bool) -> dict:
    """Samples from a finished masked-diffusion run (mdm, genmd4), the loss-curve plot, and the run's summary."""
    cfg, say = run.cfg, run.say
    samples = []
    if run.step >= cfg.train.steps and cfg.train.samples and cfg.diffusion.objective in ("mdm", "genmd4"):
        samples = sample_and_show(run.model, cfg, run.data, run.device, run.autocast, say, run.objective)
    run.log.close()
    if run.rank == 0 and cfg.logging.plot:
        say(f"loss curves: {plot_runs([run.run_dir], run.run_dir / 'loss.png')}")
    return {"step": run.step, "val_loss": val_loss, "true_entropy": true_entropy(run.data, run.objective),
            "run_dir": str(run.run_dir), "samples": samples, "preempted": preempted}


def true_entropy(data, objective) -> Optional[float]:
    """What the validation loss bounds, nats/token, when the data knows it: the entropy of a whole sequence per
    token, or for AR, which scores tokens 2..L given their prefixes, the language's entropy rate."""
    lang = data.info.get("language") if data.info else None
    if objective.causal and lang is not None and hasattr(lang, "entropy_rate"):
        return float(lang.entropy_rate)
    return data.true_entropy


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


# The end-of-training samples' sampler: on the quickstart checkpoint at its step count (64 steps for 64 tokens),
# `benchmarks/sampling.py --grid remdm` scores it within noise of the closest bigram statistics (TV 0.124, best
# 0.115) with 97% valid transitions, where LLaDA's low-confidence decoding collapses (TV 0.33-0.71;
# docs/downstream.md, inference-time scaling).
SHOW_SAMPLER = {"sampler": "remdm", "remdm": ("loop", 0.02, 0.9)}
SHOW_SAMPLER_NAME = "ReMDM loop, eta 0.02, top-p 0.9"


def sample_and_show(model, cfg: Config, data, device, autocast, say, objective: Objective) -> list[list[int]]:
    """A few unconditional samples at the end of training; on the synthetic language each is scored by the true
    language: its NLL per token against the entropy, its unigram entropy against real samples', and the
    fraction of valid transitions."""
    import numpy as np

    from model.remdm import ReMDMConfig
    from model.sample import generate, row_generators
    model.eval()
    n = cfg.train.samples
    length = min(cfg.data.seq_len, 64)
    steps = min(cfg.train.sample_steps, length)
    kw = dict(SHOW_SAMPLER, remdm=ReMDMConfig(*SHOW_SAMPLER["remdm"])) if "remdm" in SHOW_SAMPLER else SHOW_SAMPLER
    with autocast:
        out = generate(model, None, mask_id=cfg.model.mask_id, gen_length=length, steps=steps, batch_size=n,
                       generator=row_generators([cfg.train.seed * 1009 + i for i in range(n)], device),
                       temperature=cfg.train.sample_temperature, objective=objective, **kw)
    rows = out.tolist()
    say(f"samples ({length} tokens, {steps} steps, {SHOW_SAMPLER_NAME}, temperature "
        f"{cfg.train.sample_temperature}):")
    lang = data.info.get("language")
    if lang is None:
        for row in rows:
            say(f"  {data.decode(row)}")
        return rows
    H = lang.entropy_per_token(length)
    none = np.zeros((1, 0), dtype=np.int64)
    real = lang.sample(np.random.default_rng(cfg.train.seed).random((256, length)))
    real_uni = lang.score(np.zeros((256, 0), dtype=np.int64), real)["unigram_entropy"]
    say(f"  scored by the true language: NLL per token against its entropy H = {H:.3f} (below: mode-seeking, "
        f"above: errors), unigram entropy against real samples' {real_uni:.2f} (below: repetition)")
    for row in rows:
        sc = lang.score(none, np.array([row]))
        nll = f"{sc['nll']:.3f}" if sc["finite"] else "inf"
        say(f"  {data.decode(row)}  [NLL {nll} vs H {H:.3f} | unigram H {sc['unigram_entropy']:.2f} vs "
            f"{real_uni:.2f} | valid transitions {100 * sc['valid']:.0f}%]")
    return rows
