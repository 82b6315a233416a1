"""Consolidate a checkpoint (any parallel layout, either engine) into one folder for evaluation and sharing:

    python -m pretrain.interop.export runs/NAME                    # latest checkpoint -> runs/NAME/export/
    python -m pretrain.interop.export runs/NAME/checkpoints/step_00001000 --out /somewhere --dtype bf16
    python -m pretrain.interop.export runs/NAME --format llada --out /somewhere/NAME-llada --dtype bf16

--format safetensors (default): model.safetensors (full, unsharded weights under the model's own parameter
names), config.yaml (the run's config, to rebuild the model) and the run's tokenizer files when it has them;
eval/load.py and `Transformer.load_state_dict` read it directly.

--format llada: the Hugging Face folder layout of GSAI-ML/LLaDA-8B-Base, for the tools built around LLaDA:
config.json (architectures LLaDAModelLM, every key LLaDA's loader reads), model-0000X-of-0000N.safetensors
shards (--shard-size) with model.safetensors.index.json, the tokenizer (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) and a README.md model card saying how the model was trained. LLaDA's modeling code
(configuration_llada.py, modeling_llada.py) is not part of this project: --code-from DIR copies it from a
LLaDA folder you have, otherwise load the export with that code (docs/interop.md).

Both run in one process on the CPU: DCP reshards any saved layout into the single unsharded model; DeepSpeed
checkpoints are reassembled with DeepSpeed's zero_to_fp32. EMA weights are exported when the checkpoint holds
them (--weights raw exports the trained weights instead).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from model.adapters import llada_config_json, llada_names, to_llada

from ..checkpoint.store import find_checkpoint, read_trainer_state
from ..checkpoint.weights import export_safetensors, load_ema_weights, load_model_weights
from ..config import Config, from_dict, read_yaml_mapping

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _run_config(run_dir: Path, state: dict):
    cfg_tree = state.get("config") or read_yaml_mapping(run_dir / "config.yaml", what="run config", where="")
    return cfg_tree, from_dict(Config, cfg_tree)


def export(path: Path, out: Optional[Path] = None, dtype: Optional[torch.dtype] = None) -> Path:
    from model import Transformer
    run_dir, ckpt = find_checkpoint(path)
    state = read_trainer_state(ckpt)
    cfg_tree, cfg = _run_config(run_dir, state)
    out = Path(out) if out is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    model = Transformer(cfg.model)  # plain, on the CPU: the checkpoint fills every parameter
    export_safetensors(ckpt, model, out / "model.safetensors", dtype=dtype)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg_tree, sort_keys=False))
    for name in TOKENIZER_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    (out / "export.json").write_text(yaml.safe_dump({"source": str(ckpt), "step": state.get("step"),
                                                     "engine": state.get("engine", "native"),
                                                     "dtype": str(dtype or torch.float32)}))
    return out


# ----------------------------------------------------------------------------- LLaDA layout

def checkpoint_weights(ckpt: Path, cfg, dtype: torch.dtype, weights: str = "auto") -> tuple[dict, str]:
    """(unmask name -> tensor in `dtype`, which weights) of a checkpoint. The model is built on the meta device
    and allocated directly in `dtype`, so memory holds one copy (plus DeepSpeed's fp32 reassembly, for its
    checkpoints). weights: "auto" (EMA when the checkpoint has it), "ema" or "raw"."""
    from model import Transformer
    with torch.device("meta"):
        model = Transformer(cfg.model).to(dtype)
    model.to_empty(device="cpu")
    which = "raw"
    if weights != "raw" and load_ema_weights(ckpt, model):
        which = "ema"
    elif weights == "ema":
        raise FileNotFoundError(f"{ckpt} holds no EMA weights (--weights ema); export the trained weights with "
                                f"--weights raw")
    else:
        load_model_weights(ckpt, model)
    return {k: v for k, v in model.state_dict().items()}, which


def _shard_plan(sizes: list[int], shard_bytes: int) -> list[int]:
    """Shard index (0-based) of each tensor, in order, so no shard exceeds shard_bytes unless one tensor does."""
    plan, shard, used = [], 0, 0
    for size in sizes:
        if used and used + size > shard_bytes:
            shard, used = shard + 1, 0
        plan.append(shard)
        used += size
    return plan


def tokenizer_files(run_dir: Path, out: Path, tok) -> None:
    """tokenizer.json (+ tokenizer_meta.json) and the transformers side files. A run imported from a Hugging
    Face folder kept that folder's tokenizer_config.json / special_tokens_map.json; otherwise they are
    written for PreTrainedTokenizerFast, naming the special tokens by their ids in the run's tokenizer."""
    for name in TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    if tok is None or not hasattr(tok, "tok"):
        return
    names = {k: tok.tok.id_to_token(i) for k, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                                    ("pad_token", tok.pad_id), ("mask_token", tok.mask_id))
             if i is not None}
    if not (out / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000, **names}, indent=1))
    if not (out / "special_tokens_map.json").is_file():
        (out / "special_tokens_map.json").write_text(json.dumps(names, indent=1))


def _final_validation(run_dir: Path) -> Optional[dict]:
    """The last validation record of the run's metrics.jsonl ({'step', 'val/NAME': loss, ...})."""
    last = None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if any(k.startswith("val/") for k in rec):
            last = rec
    return last


def model_card(run_dir: Path, state: dict, cfg, which: str, n_params: int) -> str:
    """README.md: what the model is and how it was trained, from the trainer state, config and metrics."""
    m, d = cfg.model, cfg.diffusion
    imported = state.get("imported_from") or {}
    steps, seq = int(state.get("step") or 0), cfg.data.seq_len
    tokens = int(state.get("consumed") or 0) * seq
    objective = ("masked diffusion (LLaDA's loss: masked-token cross-entropy / p_mask, an upper bound on -log p)"
                 if d.objective == "mdm" else "autoregressive next-token cross-entropy")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [masked-diffusion, llada, unmask]", "---", f"# {cfg.train.name}", "",
             f"A masked diffusion language model ({n_params / 1e6:,.1f}M parameters) trained with unmask and "
             f"exported in LLaDA's Hugging Face layout (`LLaDAModelLM`).", "",
             "| | |", "|---|---|",
             f"| shape | {m.n_layers} layers, d_model {m.dim}, {m.n_heads} heads ({m.kv_heads} KV), SwiGLU "
             f"{m.ffn_dim}, vocabulary {m.vocab_size}, mask id {m.mask_id}, RoPE theta {m.rope_theta:g} |",
             f"| objective | {objective}; {d.schedule} schedule, eps {d.eps:g}, t {d.t_sampling} |",
             f"| optimizer steps (this run) | {steps:,} of {cfg.train.steps:,}, global batch "
             f"{cfg.train.global_batch_size} x {seq} tokens |",
             f"| training tokens (this run) | {tokens:,} (sequences x sequence length) |",
             f"| optimizer | AdamW lr {cfg.optim.lr:g} ({cfg.optim.schedule}), weight decay "
             f"{cfg.optim.weight_decay:g} |",
             f"| data | {_data_line(cfg)} |",
             f"| weights | {'EMA of the weights' if which == 'ema' else 'the trained weights (no EMA)'} |"]
    init = getattr(cfg.train, "init_from", "")
    if init:
        lines.append(f"| initialised from | `{init}` (weights only, fresh optimizer) |")
    if imported:
        lines.append(f"| imported from | `{imported.get('source')}` ({imported.get('format')} format), not trained "
                     f"further here |" if steps == 0 else f"| imported from | `{imported.get('source')}` |")
    val = _final_validation(run_dir)
    if val:
        bounds = ", ".join(f"{k[4:]} loss {v:.4f} nats/token (ppl <= {math.exp(min(v, 50)):.2f})"
                           for k, v in val.items() if k.startswith("val/") and isinstance(v, (int, float)))
        lines.append(f"| final validation bound (step {val.get('step')}) | {bounds} |")
    else:
        lines.append("| final validation bound | none recorded (no validation in metrics.jsonl) |")
    lines += ["", "## Loading", "",
              "With LLaDA's modeling code (`configuration_llada.py`, `modeling_llada.py` from the LLaDA model "
              "repository, placed in this folder):", "", "```python",
              "from transformers import AutoModel, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
              "model = AutoModel.from_pretrained(PATH, trust_remote_code=True, torch_dtype='auto')",
              "```", "",
              "With unmask: `python -m eval.ppl --ckpt PATH ...` (converted on the fly) or "
              "`python -m pretrain.interop.convert from-llada PATH runs/NAME`.", ""]
    return "\n".join(lines)


def _data_line(cfg) -> str:
    if cfg.data.kind == "synthetic":
        return "the built-in synthetic Markov language"
    return ", ".join(f"{s.path} (weight {s.weight:g})" for s in cfg.data.sources) or cfg.data.kind


def export_llada(path: Path, out: Path, dtype: torch.dtype = torch.float32, shard_bytes: int = 5 * 10 ** 9,
                 code_from: Optional[Path] = None, weights: str = "auto") -> Path:
    from data import load_run_tokenizer
    from safetensors.torch import save_file

    run_dir, ckpt = find_checkpoint(path)
    state = read_trainer_state(ckpt)
    _, cfg = _run_config(run_dir, state)
    try:
        tok = load_run_tokenizer(run_dir, cfg)
    except FileNotFoundError:
        tok = None
    config = llada_config_json(cfg.model, eos_id=getattr(tok, "eos_id", None), pad_id=getattr(tok, "pad_id", None),
                               dtype=DTYPE_NAMES[dtype])
    sd, which = checkpoint_weights(ckpt, cfg, dtype, weights)
    names = list(llada_names(cfg.model))
    if {n for n, _ in names} != set(sd):
        raise RuntimeError(f"the LLaDA name map does not cover the model: {sorted(set(sd) ^ {n for n, _ in names})}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model-*-of-*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # a previous export's shards would mix with this one's
    plan = _shard_plan([sd[n].numel() * sd[n].element_size() for n, _ in names], shard_bytes)
    n_shards = plan[-1] + 1
    weight_map, total = {}, 0
    for shard in range(n_shards):
        file = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for (ours, theirs), s in zip(names, plan):
            if s == shard:
                tensors[theirs] = to_llada(ours, sd[ours], cfg.model).contiguous()
                weight_map[theirs] = file
                total += tensors[theirs].numel() * tensors[theirs].element_size()
        save_file(tensors, str(out / (file + ".tmp")), metadata={"format": "pt"})
        os.replace(out / (file + ".tmp"), out / file)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_files(run_dir, out, tok)
    (out / "README.md").write_text(model_card(run_dir, state, cfg, which, sum(t.numel() for t in sd.values())))
    if code_from is not None:
        code = sorted(Path(code_from).glob("*.py"))
        if not code:
            raise FileNotFoundError(f"--code-from {code_from} holds no .py files (configuration_llada.py, "
                                    f"modeling_llada.py)")
        for f in code:
            shutil.copy2(f, out / f.name)
    return out


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    t = text.strip().upper()
    for suffix, mult in (("GIB", 2 ** 30), ("MIB", 2 ** 20), ("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3)):
        if t.endswith(suffix):
            return int(float(t[:-len(suffix)]) * mult)
    return int(t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.interop.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a run directory (latest checkpoint) or a checkpoint directory")
    ap.add_argument("--out", default=None, help="output folder (default: <run>/export, or <run>/export-llada)")
    ap.add_argument("--format", choices=("safetensors", "llada"), default="safetensors")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--shard-size", default="5GB", help="llada: largest shard (default 5GB)")
    ap.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                    help="llada: EMA weights when present (auto), or insist on/skip them")
    ap.add_argument("--code-from", default=None, help="llada: copy LLaDA's modeling code (*.py) from this folder")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        if args.format == "llada":
            run_dir, _ = find_checkpoint(args.path)
            out = export_llada(Path(args.path), Path(args.out) if args.out else run_dir / "export-llada", dtype,
                               parse_size(args.shard_size), Path(args.code_from) if args.code_from else None,
                               args.weights)
            shards = len(list(out.glob("model-*.safetensors")))
            print(f"wrote {out} (config.json, {shards} shard(s) + index, tokenizer, README.md)")
            return
        out = export(Path(args.path), Path(args.out) if args.out else None,
                     torch.bfloat16 if args.dtype == "bf16" else None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"export error: {e}")
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.yaml'}")


if __name__ == "__main__":
    main()
