"""Typed run configuration: dataclasses, loaded from YAML with dotted `key.sub=value` overrides.

Everything is validated at load time: unknown keys (with the closest valid key suggested), wrong types,
values outside their choices and impossible combinations all fail before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from model.config import ModelConfig, get_preset
from model.objectives import DiffusionConfig, build_objective


class ConfigError(ValueError):
    """A configuration problem, with a message naming the key and what would be valid."""


@dataclass
class SyntheticConfig:
    """Built-in corpus: a random sparse Markov chain whose entropy rate is known exactly."""
    num_symbols: int = 64
    branching: int = 4  # successors per symbol
    concentration: float = 0.5  # Dirichlet concentration of each row's transition probabilities
    seed: int = 1234  # the language itself (independent of the training seed)


@dataclass
class SourceConfig:
    """One prepared dataset (a folder written by `python -m data.prepare`) in a blend."""
    path: str = ""
    weight: float = 1.0  # share of training samples drawn from it (normalized over the sources)
    reader: Literal["native", "megatron-core"] = "native"  # megatron-core: read shards through its IndexedDataset


@dataclass
class PrepareConfig:
    """How to prepare data.sources[0] on first use, when its folder does not exist yet (python -m data.prepare
    takes the same settings as flags)."""
    inputs: list[str] = field(default_factory=list)  # local files, globs or folders (txt, jsonl, json, parquet, .gz)
    hf_dataset: str = ""  # or a Hugging Face dataset id (e.g. wikitext)
    hf_config: str = ""  # e.g. wikitext-103-raw-v1
    split: str = "train"
    streaming: bool = True
    text_field: str = "text"
    doc_split: Literal["paragraph", "line", "file", "wikitext"] = "paragraph"  # what a document is in text files
    on_decode_error: Literal["strict", "replace"] = "strict"
    max_docs: int = 0  # 0: all
    strip_gutenberg: bool = False  # text files: keep only the lines between `*** START OF` and `*** END OF`
    tokenizer: str = "bpe"  # "bpe" (train a byte-level BPE), a tokenizer.json path, a folder, or a hub name
    vocab_size: int = 8192  # for a trained BPE, special tokens included
    bpe_sample_bytes: int = 1 << 30  # train the BPE on at most this much text
    mask_token: str = "<|mask|>"
    eos_token: str = ""  # "": the tokenizer's own EOS, else <|endoftext|> is added
    shard_tokens: int = 100_000_000
    workers: int = 2  # tokenizing processes (0: one per core)
    writer: Literal["native", "megatron-core"] = "native"


@dataclass
class DataConfig:
    kind: Literal["synthetic", "prepared"] = "synthetic"
    seq_len: int = 128
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    prepare: Optional[PrepareConfig] = None
    valid_fraction: float = 0.01  # held out by document
    extra_valid: list[str] = field(default_factory=list)  # text files (or prepared folders) evaluated as extra validation sets
    extra_valid_doc_split: Literal["paragraph", "line", "file", "wikitext"] = "paragraph"
    random_length_prob: float = 0.01  # LLaDA: this fraction of batches is cut to a random length in [1, L]
    # packed: documents (each + EOS) packed back to back into seq_len windows; wrapped: MDLM's training blocks,
    # [BOS] + (seq_len - 2) + [EOS] cut from that stream (EOS between documents), so a model trained this way
    # is not charged for a block's framing tokens at zero-shot evaluation (eval.ppl --protocol mdlm)
    framing: Literal["packed", "wrapped"] = "packed"
    unique_tokens: int = 0  # data-constrained runs: train on the first U unique tokens of the shuffled order, repeated; 0: all


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    grad_clip: float = 1.0  # 0 disables
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: final fraction of steps with linear decay to min_lr


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    steps: int = 1000
    global_batch_size: int = 32  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 0  # sequences per rank per forward; 0: global / data-parallel degree
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: latest checkpoint in the run directory; none; or a checkpoint path
    # Continued pretraining: start from this run directory or checkpoint's weights only (fresh optimizer, step
    # 0; `python -m pretrain.interop.convert` makes one from a LLaDA or SMDM checkpoint). A checkpoint of this run
    # itself, when there is one to resume, takes precedence. "": start from random weights.
    init_from: str = ""
    samples: int = 4  # sequences sampled at the end of training (0 to skip)
    sample_steps: int = 64
    sample_temperature: float = 1.0
    peak_flops: float = 0.0  # per device, for MFU; 0: measured fp32 matmul peak on CPU, table on CUDA
    threads: int = 0  # torch CPU threads; 0: leave the default
    stop_after: int = 0  # stop (after saving) once this many steps ran in this process; 0: never (tests, drills)
    # Fault tolerance (docs/fault-tolerance.md)
    keep_every: int = 0  # checkpoints at multiples of this step are milestones, never rotated away; 0: none
    max_bad_steps: int = 10  # stop after this many consecutive skipped (non-finite / spiking) steps; 0: never
    loss_spike_factor: float = 0.0  # skip a step whose loss exceeds k x the running median; 0: off
    loss_spike_window: int = 100  # good steps in that running median
    allow_config_change: list[str] = field(default_factory=list)  # keys a resumed run may change knowingly
    verify_checkpoint: Literal["hash", "size", "none"] = "hash"  # manifest check before a checkpoint loads
    preempt_grace_s: float = 0.0  # SIGTERM: save only if it fits in this many seconds after the signal; 0: always save
    # Ranks agree on a pending signal (a host all-reduce) every this many steps, and before every eval and save;
    # 0: every step on the CPU, every 10 steps on CUDA (the agreement holds the host back from running ahead)
    preempt_check_every: int = 0
    gc_every: int = 50  # Python's garbage collector runs every this many steps, on every rank at once; 0: Python's own
    ema_decay: float = 0.0  # exponential moving average of the weights (MDLM: 0.9999), kept in checkpoints; 0: off


@dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "unmask"
    progress_bar: bool = True
    plot: bool = True  # write runs/<name>/loss.png (loss curves, learning rate) when a run ends


@dataclass
class ParallelConfig:
    engine: Literal["native", "deepspeed"] = "native"
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves after dp_replicate and tp
    tp: int = 1
    # full: recompute every block; selective: every ac_every-th block; op: every block, but keep the outputs of
    # matmuls and attention (recompute only norms, RoPE and activations)
    activation_checkpoint: Literal["none", "full", "selective", "op"] = "none"
    ac_every: int = 2  # selective: checkpoint every N-th block
    compile: bool = False
    reshard_after_forward: Literal["default", "always", "never"] = "default"  # FSDP2; default: all units but the head
    async_tp: bool = False  # CUDA + tp > 1 + compile: overlap TP collectives with matmuls (symmetric memory)
    reduce_every_micro_batch: bool = False  # true: FSDP reduces gradients after every micro-batch (less memory)
    timeout_s: int = 0  # process-group timeout in seconds (collectives waiting longer fail); 0: torch's default
    # NCCL only: after the first step (compilation, the first checkpoint load are over) collectives time out after
    # this many seconds, so a hung rank is found in minutes, not after the long start-up timeout; 0: keep timeout_s
    step_timeout_s: int = 300
    # FSDP2 on one rank (a size-1 mesh) in fp32 too; on CUDA, and for bf16, the native engine always uses FSDP2's
    # MixedPrecisionPolicy at every data-parallel degree (one precision path); this forces it on the CPU (tests)
    fsdp_one_rank: bool = False
    flight_recorder: int = 0  # NCCL flight recorder: keep this many collective records, dumped on timeout; 0: off
    float8: bool = False  # CUDA (H100+) with torchao: float8 matmuls in the blocks' linear layers (head stays bf16)
    zero_stage: int = 1  # deepspeed only
    async_save: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        checks = [
            (bool(self.train.init_from) and self.train.resume not in ("auto", "none"),
             f"train.init_from={self.train.init_from} and train.resume={self.train.resume} both name a starting "
             f"point: use init_from for weights only (fresh optimizer, step 0), resume to continue a run exactly"),
            (not 0 <= self.diffusion.eps < 1, f"diffusion.eps={self.diffusion.eps} must lie in [0, 1)"),
            (self.data.seq_len > self.model.max_seq_len,
             f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"),
            (self.data.seq_len < 2, "data.seq_len must be at least 2"),
            (not 0 <= self.data.random_length_prob <= 1, "data.random_length_prob must lie in [0, 1]"),
            (self.train.steps <= 0, "train.steps must be positive"),
            (self.train.global_batch_size <= 0, "train.global_batch_size must be positive"),
            (self.optim.warmup_steps < 0, "optim.warmup_steps must be >= 0"),
            (not 0 <= self.optim.decay_fraction <= 1, "optim.decay_fraction must lie in [0, 1]"),
            (self.optim.min_lr > self.optim.lr, f"optim.min_lr={self.optim.min_lr} exceeds optim.lr={self.optim.lr}"),
            (self.data.kind == "prepared" and not self.data.sources,
             "data.kind=prepared needs data.sources (a list of {path, weight}) — prepare one with python -m data.prepare"),
            (self.data.kind == "prepared" and self.data.prepare is not None and len(self.data.sources) != 1,
             "data.prepare prepares one folder: give exactly one entry in data.sources (its path is the output)"),
            (self.data.prepare is not None and bool(self.data.prepare.inputs) == bool(self.data.prepare.hf_dataset),
             "data.prepare needs either inputs (local files) or hf_dataset (a hub id), not both and not neither"),
            (any(not s.path for s in self.data.sources), "every data.sources entry needs a path"),
            (any(not s.weight > 0 for s in self.data.sources), "data.sources weights must be positive"),
            (not 0 <= self.data.valid_fraction < 0.5, "data.valid_fraction must lie in [0, 0.5)"),
            (self.data.unique_tokens < 0, "data.unique_tokens must be >= 0 (0: all the training data)"),
            (self.data.unique_tokens > 0 and self.data.kind != "prepared",
             "data.unique_tokens needs data.kind=prepared (the synthetic language has no finite set to repeat)"),
            (self.data.kind == "synthetic" and bool(self.data.extra_valid),
             "data.extra_valid needs data.kind=prepared (text is tokenized with the prepared data's tokenizer)"),
            (self.parallel.zero_stage not in (0, 1, 2, 3), "parallel.zero_stage must be 0, 1, 2 or 3"),
            (self.diffusion.ce_chunk < 0, f"diffusion.ce_chunk={self.diffusion.ce_chunk} must be >= 0 (rows of logits "
             "per cross-entropy chunk; 0: all at once)"),
            (self.parallel.timeout_s < 0, f"parallel.timeout_s={self.parallel.timeout_s} must be >= 0 (0: torch's default)"),
            (self.parallel.step_timeout_s < 0, f"parallel.step_timeout_s={self.parallel.step_timeout_s} must be >= 0 "
             "(0: keep parallel.timeout_s after the first step)"),
            (self.parallel.flight_recorder < 0, "parallel.flight_recorder must be >= 0 (records kept; 0: off)"),
            (self.parallel.float8 and (self.parallel.tp > 1 or self.parallel.engine != "native"),
             "parallel.float8=true runs with the native engine and data parallelism only (float8 tensor parallel "
             "needs torchao's float8 TP styles, not wired in): set parallel.tp=1 and parallel.engine=native, or "
             "float8=false"),
            (self.parallel.async_tp and (self.parallel.tp < 2 or not self.parallel.compile),
             "parallel.async_tp=true needs parallel.tp > 1 and parallel.compile=true (it is a compiler pass over "
             "the tensor-parallel collectives); set both or turn async_tp off"),
            (self.train.eval_every <= 0 or self.train.log_every <= 0 or self.train.save_every <= 0,
             "train.eval_every, train.log_every and train.save_every must be positive"),
            (self.train.keep_every < 0 or self.train.max_bad_steps < 0 or self.train.keep_checkpoints < 0,
             "train.keep_every, train.max_bad_steps and train.keep_checkpoints must be >= 0 (0: off / keep all)"),
            (self.train.loss_spike_factor < 0 or 0 < self.train.loss_spike_factor <= 1,
             f"train.loss_spike_factor={self.train.loss_spike_factor} must be 0 (off) or above 1 (a multiple of "
             f"the running median loss, e.g. 3)"),
            (self.train.loss_spike_window < 1, "train.loss_spike_window must be at least 1"),
            (self.train.loss_spike_factor > 0 and self.parallel.engine == "deepspeed",
             "train.loss_spike_factor needs parallel.engine=native: DeepSpeed applies the update inside its own "
             "step, before the loss can be judged (its ZeRO stages still drop non-finite updates)"),
            (self.train.preempt_grace_s < 0, "train.preempt_grace_s must be >= 0 (0: always save on a signal)"),
            (self.train.preempt_check_every < 0 or self.train.gc_every < 0,
             "train.preempt_check_every and train.gc_every must be >= 0 (0: the default behaviour)"),
            (not 0 <= self.train.ema_decay < 1, f"train.ema_decay={self.train.ema_decay} must lie in [0, 1) (0: no "
             f"EMA; MDLM uses 0.9999)"),
            (self.train.ema_decay > 0 and self.parallel.engine == "deepspeed",
             "train.ema_decay needs parallel.engine=native (the EMA is kept and checkpointed with the DCP state); "
             "set train.ema_decay=0 with DeepSpeed"),
            (not self.diffusion.poly_exponent > 0, f"diffusion.poly_exponent={self.diffusion.poly_exponent} must be "
             f"> 0 (schedule=poly: alpha = 1 - t^k; MD4 uses e.g. 2 or 3)"),
            (self.data.framing == "wrapped" and self.data.kind != "prepared",
             "data.framing=wrapped needs data.kind=prepared (text with an EOS token; the synthetic language has no "
             "documents to frame)"),
            (self.data.framing == "wrapped" and self.data.seq_len < 3,
             f"data.framing=wrapped needs data.seq_len >= 3 ([BOS] + text + [EOS]), got {self.data.seq_len}"),
        ]
        for bad, message in checks:
            if bad:
                raise ConfigError(message)
        try:
            self.model.validate()
            # The objective checks its own settings and what it needs of the model (causal, time input, ...).
            objective = build_objective(self.diffusion, mask_id=self.model.mask_id, vocab_size=self.model.vocab_size)
            objective.check_model(self.model)
            objective.check_seq_len(self.data.seq_len)  # block diffusion: the block size must divide it
        except ValueError as e:
            raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- generic loading

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp, key: str):
    """Check/convert one YAML value against a type annotation; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of "
                          f"{', '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not a valid choice; choose one of: "
                              f"{', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _unknown_key(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f" Did you mean {prefix}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {prefix}{key}.{hint} Valid keys under "
                       f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain dict, strictly."""
    hints = typing.get_type_hints(cls)
    field_names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data)
    if cls is ModelConfig and data.get("preset"):
        if not isinstance(data["preset"], str):
            raise ConfigError(f"{prefix}preset must be a string, got {data['preset']!r}")
        try:
            base = dataclasses.asdict(get_preset(data["preset"]))
        except ValueError as e:
            raise ConfigError(f"{prefix}preset: {e}") from None
        base.update(data)
        data = base
    kwargs = {}
    for key, value in data.items():
        if key not in field_names:
            raise _unknown_key(cls, key, prefix)
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def to_dict(obj) -> dict:
    out = dataclasses.asdict(obj)

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(out)


def _set_dotted(tree: dict, dotted: str, value, root_cls, text: Optional[str] = None) -> None:
    """Set `dotted` in the plain config tree, checking each key against the dataclasses. `text`: the value as
    written on a command line; a str field takes it verbatim where YAML read a bool or a number (train.name=off
    is the name "off", not False)."""
    parts = dotted.split(".")
    cls = root_cls
    node = tree
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        hint, args = None, []
        if cls is not None and dataclasses.is_dataclass(cls):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise _unknown_key(cls, part, prefix)
            hint = typing.get_type_hints(cls)[part]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            cls = hint if dataclasses.is_dataclass(hint) else (args[0] if len(args) == 1 and
                                                              dataclasses.is_dataclass(args[0]) else None)
        if i == len(parts) - 1:
            if text is not None and isinstance(value, (bool, int, float)) and (hint is str or args == [str]):
                value = text
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml_mapping(path, *, what: str = "config file", where: str = " (the recipes live in configs/)",
                      holds: str = "sections (model, data, train, ...)", error: type = ConfigError) -> dict:
    """The mapping a YAML file holds (an empty file: {}), or `error` saying what is wrong: the `what` at
    `path` does not exist (`where` hints where they live), is not valid YAML or not text, or holds no
    mapping (of `holds`)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {path} does not exist{where}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not a text (UTF-8) YAML file: {e}") from None
    if not isinstance(tree, dict):
        raise error(f"{path} must hold a mapping of {holds}")
    return tree


def load_run_config(run_dir) -> Config:
    """The Config a run directory's config.yaml records (as written at the start of the run: not validated
    again, so a run written by an older unmask still loads for evaluation and export)."""
    return from_dict(Config, read_yaml_mapping(Path(run_dir) / "config.yaml", what="run config", where=""))


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    tree = read_yaml_mapping(path) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, Config, text=item.split("=", 1)[1].strip())
    cfg = from_dict(Config, tree)
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
