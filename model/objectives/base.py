"""The objective interface: everything that differs between members of the discrete-diffusion family.

An objective is the probabilistic model around the network: how clean tokens are noised, what the network is
asked to predict and how that prediction is scored (the training loss), the per-sequence bound that
evaluation reports, and the reverse step that generation takes. The trainer (pretrain.loop), the bounds
(eval.elbo, eval.ppl) and generation (model.sample) see only this interface, so adding an objective is one
file in this folder, one line in `__init__.py`, and its tests.

The life of one training step, with where each method comes in:

    noise = objective.draw(seed, step, G, L, ...)        # all randomness of the step, for the GLOBAL batch,
                                                          # a pure function of (seed, step), on the host
    rows = noise.rows(rank_rows[m], length)               # this micro-batch's slice of it
    noised = objective.noise(x0, rows, doc_ids)           # host: model input, where logits are needed, targets
    loss, stats = objective.loss(model, noised.to(dev))   # the micro-batch loss (an unbiased NELBO estimate
                                                          # or a surrogate whose expectation is documented)

Because the draw spans the global batch and the micro-batch only slices it, every parallel layout and every
resume sees the same noise for the same sample.

Evaluation: `eval_methods` names the estimators the objective supports (the first is its default).
`eval_draw` gives the noise and weight of one Monte Carlo sample of one sequence, `eval_sums` the weighted
sums for a batch of them; `exact` objectives (AR) have no Monte Carlo at all. `exact_nelbo` computes the
bound by brute force for tests.

Generation: `reverse_step` is the posterior over the next state given the network's clean-token
distribution; masked objectives also give `unmask_prob`, which the shared samplers (LLaDA, MDLM ancestral,
KV caches, decoding policies) use.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch


# ------------------------------------------------------------------------------------------- the step's noise
def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one training step: a pure function of (seed, step). Drawn on the host, the noise is
    the same on every device, and drawing it never waits for the accelerator."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)


def sample_u(n: int, generator: torch.Generator, stratified: bool, device=None) -> torch.Tensor:
    """n draws of u in (0, 1]. Stratified: u_j = 1 - ((u0 + j / n) mod 1), shuffled, so the n draws cover
    (0, 1] evenly (low-discrepancy sampling; MDLM/MD4/SMDM do it per rank, here it spans the global batch)."""
    if stratified:
        u0 = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
        grid = (u0 + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
        u = 1.0 - grid[torch.randperm(n, generator=generator, device=device)]
    else:
        u = 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return u.float()


def noise_level(u: torch.Tensor, eps: float) -> torch.Tensor:
    """t = (1 - eps) u + eps: keeps t off zero (LLaDA)."""
    return (1.0 - eps) * u + eps


@dataclass
class StepNoise:
    """All randomness of one optimizer step, drawn for the *global* batch so every layout sees the same noise.

    u: (G,) or (G, k) noise draws per sequence; mask_uniform: (G, L) per-position uniforms; length: this step's
    sequence length (the random-length option); extra: objective-specific draws, (G, ...) tensors, of which
    those named in `positional` are per position ((G, L, ...), cut to the step's length with the rest)."""
    u: torch.Tensor
    mask_uniform: torch.Tensor
    length: int
    extra: dict = field(default_factory=dict)
    positional: tuple = ()

    def rows(self, rows, length: Optional[int] = None) -> "StepNoise":
        """The draws of some rows of the global batch (a micro-batch), cut to `length` positions."""
        length = self.length if length is None else length
        extra = {k: (v[rows, :length] if k in self.positional else v[rows]) for k, v in self.extra.items()}
        return StepNoise(self.u[rows], self.mask_uniform[rows, :length], length, extra, self.positional)

    def to(self, device) -> "StepNoise":
        return StepNoise(self.u.to(device), self.mask_uniform.to(device), self.length,
                         {k: v.to(device) for k, v in self.extra.items()}, self.positional)


def draw_step_noise(seed: int, step: int, global_batch: int, seq_len: int, *, stratified: bool,
                    random_length_prob: float, device=None) -> StepNoise:
    """The masked-diffusion draw: one u per sequence (stratified over the global batch), a uniform per
    position, and the random-length coin. A pure function of (seed, step), drawn on the host (then copied
    to `device`): resuming, or changing the parallel layout, reproduces it exactly."""
    gen = step_generator(seed, step)
    u = sample_u(global_batch, gen, stratified)
    mask_uniform = torch.rand(global_batch, seq_len, generator=gen)
    coin, frac = torch.rand(2, generator=gen, dtype=torch.float64).tolist()  # host values: no device sync
    length = seq_len
    if coin < random_length_prob:
        length = 1 + int(frac * seq_len)  # uniform in [1, seq_len]
    noise = StepNoise(u, mask_uniform, length)
    return noise if device is None or torch.device(device).type == "cpu" else noise.to(device)


# ------------------------------------------------------------------------------------------ a noised batch
@dataclass
class Noised:
    """One micro-batch after the forward process, ready for the network.

    xt: (B, L) model input; t: (B,) noise level the network is conditioned on (None without time
    conditioning); at: where logits are needed (a (B, L) bool mask, row-major; None: every position);
    targets/weights: per selected position (objective-defined); doc_ids: document ids of packed data;
    extra: anything else the objective's loss needs (per-row tensors).

    `to(device)` also computes, on the host, `index`: the flat row-major positions of `at`, which the network
    takes instead of the boolean mask (boolean indexing on an accelerator waits for the device). `mask_known`:
    the training step checked on the host that doc_ids, when given, separates documents (no device check)."""
    x0: torch.Tensor
    xt: torch.Tensor
    t: Optional[torch.Tensor] = None
    at: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    doc_ids: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
    index: Optional[torch.Tensor] = None
    mask_known: bool = False

    def to(self, device, non_blocking: bool = True) -> "Noised":
        def move(v):
            return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        out = self
        if self.index is None and isinstance(self.at, torch.Tensor) and self.at.dtype == torch.bool \
                and self.at.device.type == "cpu":
            out = dataclasses.replace(self, index=self.at.flatten().nonzero().squeeze(1))
        return dataclasses.replace(out, **{f.name: move(getattr(out, f.name)) for f in dataclasses.fields(out)
                                           if f.name != "extra"},
                                   extra={k: move(v) for k, v in out.extra.items()})

    def selected(self):
        """Where the network computes logits: the host-computed flat index when there is one, else `at`."""
        return self.index if self.index is not None else self.at


def pad(rows: list[torch.Tensor], fill, device, length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D rows to one (R, length) tensor (default: the longest row); also returns where rows are real."""
    L = max(r.numel() for r in rows) if length is None else length
    out = torch.full((len(rows), L), fill, dtype=rows[0].dtype)
    keep = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
        keep[i, :r.numel()] = True
    return out.to(device), keep.to(device)


@dataclass
class EvalDraw:
    """One Monte Carlo sample of one sequence at evaluation: the noise (objective-defined, e.g. the masked
    positions) and the estimator's weight."""
    noise: Any
    weight: float


# ------------------------------------------------------------------------------------------- the interface
class Objective(abc.ABC):
    """One member of the family. Subclasses set the class attributes and implement the abstract methods.

    What the network must provide:
      causal            the attention layout: causal (AR) or bidirectional
      time_conditioning the network needs the noise level (model.time_conditioning=adaln)
      head_has_mask     the output head includes the mask token (False: the head covers real tokens only)
      logits_at         where logits are computed: "masked" (noised positions), "all", or "next" (AR)
    """
    name: ClassVar[str] = "base"
    causal: ClassVar[bool] = False
    time_conditioning: ClassVar[bool] = False
    head_has_mask: ClassVar[bool] = True
    logits_at: ClassVar[str] = "masked"
    eval_methods: ClassVar[tuple[str, ...]] = ()
    exact: ClassVar[bool] = False  # the bound is an exact likelihood (no Monte Carlo)
    summary: ClassVar[str] = ""  # one line for docs and run logs
    title: ClassVar[str] = ""  # what users call it ("masked diffusion")
    input_multiplier: ClassVar[int] = 1  # network tokens per training token (block diffusion's [x_t, x_0]: 2)

    @property
    def forward_passes(self) -> int:
        """Network passes per training sequence and step (GenMD4's two masks per t: 2); FLOP and memory counts
        multiply every term by it, and logit_fraction is per pass."""
        return 1

    def __init__(self, dcfg, *, mask_id: Optional[int] = None, vocab_size: Optional[int] = None):
        self.cfg, self.mask_id, self.vocab_size = dcfg, mask_id, vocab_size

    # -- checks
    def check_model(self, mcfg) -> None:
        """Raise ValueError when the model cannot serve this objective (naming the key to change)."""
        if bool(mcfg.causal) != self.causal:
            want = "true" if self.causal else "false"
            why = "an autoregressive model must not see the future" if self.causal else \
                f"{self.title} is bidirectional"
            raise ValueError(f"diffusion.objective={self.name} needs model.causal={want} ({why})")
        cond = getattr(mcfg, "time_conditioning", "none")
        if self.time_conditioning and cond == "none":
            raise ValueError(f"diffusion.objective={self.name} needs the noise level as an input: set "
                             f"model.time_conditioning=adaln")

    # -- learned parameters of the objective itself (optional)
    no_decay_prefixes: ClassVar[tuple[str, ...]] = ()  # parameter-name prefixes the optimizer never decays
    logged_stats: ClassVar[tuple[str, ...]] = ()  # keys of loss()'s stats the trainer logs with each step line

    def init_modules(self, model) -> None:
        """Attach the objective's own learned parameters to the model as submodules (e.g. GenMD4's per-token
        exponents as `model.noise_schedule`), before the model is parallelized, loaded or handed to the
        optimizer, so training, FSDP/TP and checkpoints treat them like every other parameter. Default: none."""

    def for_validation(self) -> "Objective":
        """The objective whose loss the trainer's validation logs as the bound: itself, unless training uses a
        biased surrogate (block diffusion's clipped noise interval validates with the unbiased (eps, 1))."""
        return self

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ValueError when the objective cannot train on sequences of this length (block diffusion: the
        block size must divide it)."""

    # -- a training noise chosen at validation (optional; block diffusion's clipped interval, BD3-LM's var_min)
    def variants(self) -> dict:
        """{key: objective}: alternatives of the training noise that validation compares by the variance of
        their per-unit losses (`unit_losses` on the validation batches, with the validation noise), after which
        the trainer calls `adopt`. Default: none (nothing is searched)."""
        return {}

    def unit_losses(self, model, batch: Noised, *, ce_chunk: int = 0) -> torch.Tensor:
        """(B, k) losses of a noised micro-batch's units (block diffusion: each block's mean weighted loss)
        whose variance `variants` are compared by."""
        raise NotImplementedError(f"{self.name} has no per-unit losses")

    def adopt(self, variances: dict) -> dict:
        """Take the variant of least variance ({key: summed variance over the validation batches}) as the
        training noise from now on; returns what the trainer logs about the choice."""
        raise NotImplementedError(f"{self.name} has no variants")

    def state(self) -> dict:
        """What a checkpoint must keep of the objective besides the model's parameters (an adopted variant),
        so a resumed run trains on the same noise. Default: nothing."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore `state()` on resume."""

    # -- noising and the training loss
    def draw(self, seed: int, step: int, global_batch: int, seq_len: int, *, stratified: bool = True,
             random_length_prob: float = 0.0) -> StepNoise:
        """All randomness of one step for the global batch, on the host: a pure function of (seed, step)."""
        return draw_step_noise(seed, step, global_batch, seq_len, stratified=stratified,
                               random_length_prob=random_length_prob)

    @abc.abstractmethod
    def noise(self, x0: torch.Tensor, noise: StepNoise, doc_ids: Optional[torch.Tensor] = None) -> Noised:
        """Clean tokens x0 (B, L) plus their rows of the step's draw -> the network's input."""

    @abc.abstractmethod
    def loss(self, model, batch: Noised, *, ce_chunk: int = 0) -> tuple[torch.Tensor, dict]:
        """The micro-batch's training loss (a scalar) and detached statistics."""

    def micro_loss(self, model, x0, noise: StepNoise, doc_ids=None, *, ce_chunk: int = 0):
        """noise() then loss(), on x0's device."""
        return self.loss(model, self.noise(x0, noise, doc_ids), ce_chunk=ce_chunk)

    def logit_fraction(self, seq_len: int) -> float:
        """Expected fraction of positions whose logits the training loss computes (FLOP and memory counts)."""
        return 1.0

    # -- the bound
    def eval_draw(self, method: str, *, seed: int, seq: int, sample: int, samples: int, maskable: torch.Tensor,
                  eps: float, group: int) -> EvalDraw:
        raise NotImplementedError(f"{self.name} has no Monte Carlo bound estimator")

    def eval_sums(self, model, x0: torch.Tensor, draws: list[EvalDraw], *, keep: torch.Tensor,
                  subs: bool = True) -> torch.Tensor:
        """(R,) float64: each row's weighted estimate (nats, summed over its scored positions)."""
        raise NotImplementedError(f"{self.name} has no Monte Carlo bound estimator")

    def exact_nelbo(self, cond_logprobs, x0: torch.Tensor) -> float:
        """The bound of one short sequence by brute force (tests): cond_logprobs(xt (L,)) -> (L, V) float64
        log-probabilities of the clean token at every position given the network input xt."""
        raise NotImplementedError(f"{self.name} has no enumeration")

    def conditional_refusal(self) -> Optional[str]:
        """Why eval/likelihood.py's masked-answer estimator of log p(answer | context) (LLaDA's: mask l of the
        answer's n tokens, l uniform, score them with the network's softmax without a noise level, weight n / l)
        is NOT a bound of this objective's model, as a one-line message; None where it is (masked diffusion) or
        the objective is exact (AR scores answers by its own path). Default: refused for a time-conditioned
        network (its softmax needs the noise level, and its bound is its own estimator's)."""
        if self.time_conditioning and not self.causal:
            return (f"conditional log-likelihoods (lm-eval loglikelihood, eval.lambada) use the masked-diffusion "
                    f"estimator, which is not a bound for diffusion.objective={self.name} ({self.title}: a "
                    f"time-conditioned network with its own bound): refused rather than reporting a wrong "
                    f"number; loglikelihood_rolling / eval.ppl (its own estimator) and generate_until work")
        return None

    # -- generation
    def reverse_step(self, p_x0: torch.Tensor, z_t: torch.Tensor, t: float, s: float) -> torch.Tensor:
        """(N, V) float64: the posterior p(z_s | z_t) over every state, given the network's clean-token
        distribution p_x0 (N, V) at the N positions z_t (N,), from time t to s < t."""
        raise NotImplementedError(f"{self.name} does not define a reverse step")


# -------------------------------------------------------------------------------------------- the registry
OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def build_objective(dcfg, *, mask_id: Optional[int] = None, vocab_size: Optional[int] = None) -> Objective:
    """The objective named by diffusion.objective, configured by the rest of the diffusion section."""
    name = dcfg.objective
    if name not in OBJECTIVES:
        import difflib
        close = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown diffusion.objective {name!r}{hint}; choices: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](dcfg, mask_id=mask_id, vocab_size=vocab_size)
