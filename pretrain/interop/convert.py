"""Import checkpoints published by other masked-diffusion projects as unmask run directories:

    python -m pretrain.interop.convert from-llada GSAI-ML/LLaDA-8B-Base runs/llada-8b-base  # hub id (network)
    python -m pretrain.interop.convert from-llada /models/LLaDA-8B-Base runs/llada-8b-base  # local folder
    python -m pretrain.interop.convert from-smdm /models/smdm-170M.safetensors runs/smdm-170m --tokenizer tok.json

The result is a normal run directory: config.yaml, the tokenizer (tokenizer.json + tokenizer_meta.json, mask id
included) and checkpoints/step_00000000 (a DCP checkpoint holding the weights, no optimizer state). eval.ppl,
eval.generate, eval.downstream and `python -m pretrain.interop.export` read it like any run, and
`python -m pretrain ... train.init_from=DST` continues pretraining from it (weights only, fresh optimizer,
step 0). Shards are read one tensor at a time (safetensors, memory-mapped) straight into the state that is
saved, so memory holds one copy of the model, in the source dtype (bf16 for LLaDA-8B: 16 GB).

Architectures the unmask Transformer does not implement (MDLM's DiT, Dream's Qwen2, ALiBi or biased LLaDA
variants, ...) are refused with a message naming what is missing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, Optional

import torch

from model.adapters import (Unsupported, from_llada_tensors, from_smdm_tensors, llada_model_config,
                            refuse_other_family, smdm_model_config)
from model.config import ModelConfig

from ..checkpoint.store import Checkpointer, list_checkpoints
from ..config import Config, load_run_config, save_config, to_dict

# Tokenizer files of a Hugging Face folder that unmask does not read but keeps next to its own, so an export
# hands the same tokenizer settings back to transformers.
HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SOURCE_FILE = "imported_from.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class ConvertError(RuntimeError):
    """Bad input to a conversion: missing files, unreadable folders, inconsistent tokenizer."""


# ----------------------------------------------------------------------------- reading safetensors lazily

class SafetensorsFolder:
    """Tensors of one .safetensors file or a sharded folder (model.safetensors.index.json), read on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        path = Path(path)
        self._stack = ExitStack()
        if path.is_file():
            files = {None: path}
        elif (path / "model.safetensors.index.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = {name: path / name for name in sorted(set(index["weight_map"].values()))}
        elif (path / "model.safetensors").is_file():
            files = {None: path / "model.safetensors"}
        else:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = f" (found {bins[0]}: convert PyTorch .bin weights to safetensors first)" if bins else ""
            raise ConvertError(f"{path} has no model.safetensors.index.json or model.safetensors{hint}")
        self.where: dict[str, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in files.values():
            if not f.is_file():
                raise ConvertError(f"shard {f} named by the index is missing")
            handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():
                sl = handle.get_slice(key)
                self.where[key] = handle
                self.shapes[key] = tuple(sl.get_shape())
                self.dtypes[key] = sl.get_dtype()

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- sources

def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) < 300 else text[:300] + " ..."


def looks_like_hub_id(src) -> bool:
    """org/name that is not a local path (a LLaDA-format model on the Hugging Face hub)."""
    s = str(src)
    # runs/NAME with a local runs/ folder is a (missing) local path, not a hub id.
    return not Path(s).expanduser().exists() and s.count("/") == 1 and not s.startswith((".", "/", "~")) \
        and not s.endswith((".json", ".safetensors", ".yaml")) and not Path(s.split("/")[0]).is_dir()


def resolve_source(src: str) -> Path:
    """A local folder, or a hub id (org/name) downloaded with huggingface_hub (fails fast offline)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(src):
        raise ConvertError(f"{src} does not exist (give a local LLaDA-format folder, or a hub id like "
                           f"GSAI-ML/LLaDA-8B-Base)")
    import os
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{src} is not a local folder and huggingface_hub is not installed to download it") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                                      local_files_only=offline))
    except Exception as e:  # network errors, gated repos, missing cache entries under HF_HUB_OFFLINE
        hint = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline else ""
        raise ConvertError(f"{src} does not exist locally, and as a hub id it could not be downloaded{hint}: "
                           f"{_short(e)}") from None


def read_config_json(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path} has no config.json: not a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}/config.json is not valid JSON: {e}") from None


def folder_tokenizer(folder: Path, mask_id: Optional[int], eos_id: Optional[int], pad_id: Optional[int],
                     vocab_size: int, add_mask: bool = False):
    """unmask's TextTokenizer for a Hugging Face folder's tokenizer.json, with the ids its config names.
    add_mask: when the mask id is the first id past the tokenizer's vocabulary (SMDM: Llama-2's 32000 ids, mask
    32000), add a mask token there. EOS / BOS default to the usual names in the vocabulary."""
    from tokenizers import AddedToken, Tokenizer

    from data.tokenizer import BOS_CANDIDATES, EOS_CANDIDATES, MASK_CANDIDATES, MASK_TOKEN, TextTokenizer
    file = Path(folder) / "tokenizer.json" if Path(folder).is_dir() else Path(folder)
    if not file.is_file():
        return None
    tok = Tokenizer.from_file(str(file))
    tok.no_truncation()
    tok.no_padding()
    vocab = tok.get_vocab(with_added_tokens=True)
    if mask_id is None:
        mask_id = next((vocab[c] for c in MASK_CANDIDATES if c in vocab), None)
        if mask_id is None:
            raise ConvertError(f"{file}: the config names no mask_token_id and the vocabulary has none of "
                               f"{', '.join(MASK_CANDIDATES)}")
    if add_mask and tok.id_to_token(mask_id) is None and tok.get_vocab_size(with_added_tokens=True) == mask_id:
        tok.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    if tok.id_to_token(mask_id) is None:
        raise ConvertError(f"{file} has no token with the mask id {mask_id}: is this the model's tokenizer?")
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ConvertError(f"{file} has {tok.get_vocab_size(with_added_tokens=True)} ids but the model's embedding "
                           f"only {vocab_size}: is this the model's tokenizer?")
    bos = next((vocab[c] for c in BOS_CANDIDATES if c in vocab), None)
    if eos_id is None:
        eos_id = next((vocab[c] for c in EOS_CANDIDATES if c in vocab), None)
    return TextTokenizer(tok, mask_id=mask_id, eos_id=eos_id, bos_id=bos, pad_id=pad_id)


# ----------------------------------------------------------------------------- writing a run directory

def check_against_model(mcfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]],
                        dtype: Optional[torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, checking each name and shape against the unmask model built on the meta device
    (and that every parameter came), casting floating tensors to `dtype` when given."""
    from model import Transformer
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(mcfg).state_dict().items()}
    seen = set()
    for name, t in tensors:
        if name not in expected:
            raise Unsupported(f"converted tensor {name!r} is not a parameter of unmask's Transformer")
        if tuple(t.shape) != expected[name]:
            raise Unsupported(f"{name}: the checkpoint has shape {tuple(t.shape)}, the model config implies "
                              f"{expected[name]}")
        seen.add(name)
        yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    missing = sorted(set(expected) - seen)
    if missing:
        raise Unsupported(f"the checkpoint does not provide {missing[:3]} ({len(missing)} missing)")


def run_config(mcfg: ModelConfig, dst: Path, seq_len: int):
    cfg = Config(model=mcfg)
    cfg.data.seq_len = min(seq_len, mcfg.max_seq_len)
    cfg.train.name, cfg.train.out_dir = dst.name, str(dst.parent)
    cfg.train.steps = 1
    return cfg


def write_run(dst: Path, cfg, state: dict, tokenizer, source: dict, hf_files: Optional[Path] = None) -> Path:
    """Write `state` (unmask names -> tensors) as checkpoints/step_00000000 of run directory `dst`."""
    import torch.distributed.checkpoint as dcp
    dst = Path(dst)
    if list_checkpoints(dst / "checkpoints"):
        raise ConvertError(f"{dst} already holds checkpoints: choose a new folder (a run's checkpoints are never "
                           f"overwritten by an import)")
    dst.mkdir(parents=True, exist_ok=True)
    save_config(cfg, dst / "config.yaml")
    if tokenizer is not None:
        tokenizer.save(dst)
    if hf_files is not None:
        for name in HF_TOKENIZER_FILES:
            if (hf_files / name).is_file():
                shutil.copy2(hf_files / name, dst / name)
    (dst / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    ckpt = Checkpointer(dst / "checkpoints", keep=1)
    tmp, final = ckpt.stage(0)
    dcp.save({"model": state}, checkpoint_id=str(tmp))
    ckpt.commit(tmp, final, {"step": 0, "consumed": 0, "seed": cfg.train.seed, "world_size": 1,
                             "engine": "native", "weights_only": True, "imported_from": source,
                             "config": to_dict(cfg)})
    return final


def import_llada(src: str, dst: Path, dtype: Optional[torch.dtype] = None, tokenizer: Optional[str] = None) -> Path:
    folder = resolve_source(str(src))
    c = read_config_json(folder)
    with SafetensorsFolder(folder) as shards:
        refuse_other_family(c, shards.keys())
        mcfg = llada_model_config(c)
        tok = folder_tokenizer(Path(tokenizer) if tokenizer else folder, mcfg.mask_id, c.get("eos_token_id"),
                               c.get("pad_token_id"), mcfg.vocab_size)
        if mcfg.mask_id is None:
            if tok is None:
                raise ConvertError(f"{folder}/config.json names no mask_token_id and there is no tokenizer.json "
                                   f"to find the mask token in")
            mcfg.mask_id = tok.mask_id
        tensors = from_llada_tensors(c, mcfg, shards.keys(), shards.get)
        state = dict(check_against_model(mcfg, tensors, dtype))
    cfg = run_config(mcfg, Path(dst), mcfg.max_seq_len)
    source = {"format": "llada", "source": str(src), "config.json": c}
    final = write_run(Path(dst), cfg, state, tok, source, hf_files=folder)
    _warn_no_tokenizer(tok, dst)
    return final


def import_smdm(src: str, dst: Path, n_heads: Optional[int] = None, tokenizer: Optional[str] = None,
                dtype: Optional[torch.dtype] = None, max_seq_len: int = 2048) -> Path:
    path = resolve_source(str(src))
    with SafetensorsFolder(path) as shards:
        refuse_other_family(None, shards.keys())
        mcfg = smdm_model_config(shards.shapes, n_heads=n_heads, max_seq_len=max_seq_len)
        tok = None
        if tokenizer:
            tok = folder_tokenizer(Path(tokenizer), mcfg.mask_id, None, None, mcfg.vocab_size, add_mask=True)
            if tok is None:
                raise ConvertError(f"{tokenizer} is not a tokenizer.json (or a folder holding one)")
        state = dict(check_against_model(mcfg, from_smdm_tensors(mcfg, shards.keys(), shards.get), dtype))
    cfg = run_config(mcfg, Path(dst), max_seq_len)
    final = write_run(Path(dst), cfg, state, tok, {"format": "smdm", "source": str(src)})
    _warn_no_tokenizer(tok, dst)
    return final


def _warn_no_tokenizer(tok, dst) -> None:
    if tok is None:
        print(f"note: no tokenizer.json was found, so {dst} has no tokenizer; evaluation needs one: rerun with "
              f"--tokenizer PATH/tokenizer.json", file=sys.stderr)


# ----------------------------------------------------------------------------- in-memory loading (eval)

def load_llada_model(folder, device="cpu", dtype: torch.dtype = torch.float32):
    """(Transformer, ModelConfig, tokenizer, config.json) for a LLaDA-format folder, converted on the fly.

    The model is built on the meta device and the converted tensors are assigned to it, so memory holds one
    copy of the weights in `dtype`."""
    from model import Transformer
    from model.transformer import rope_tables
    folder = resolve_source(str(folder))
    c = read_config_json(folder)
    with SafetensorsFolder(folder) as shards:
        refuse_other_family(c, shards.keys())
        mcfg = llada_model_config(c)
        tok = folder_tokenizer(folder, mcfg.mask_id, c.get("eos_token_id"), c.get("pad_token_id"), mcfg.vocab_size)
        if mcfg.mask_id is None and tok is not None:
            mcfg.mask_id = tok.mask_id
        with torch.device("meta"):
            model = Transformer(mcfg)
        state = {k: v.to(device=device, dtype=dtype)
                 for k, v in check_against_model(mcfg, from_llada_tensors(c, mcfg, shards.keys(), shards.get), None)}
    model.load_state_dict(state, strict=True, assign=True)
    model.rope = rope_tables(mcfg.head_dim, mcfg.max_seq_len, mcfg.rope_theta, device=device)  # not a weight
    return model.eval(), mcfg, tok, c


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.interop.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-llada", help="a LLaDA-format Hugging Face folder (or hub id) -> a run directory")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the folder's")
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="store weights as (default: as the source)")
    s = sub.add_parser("from-smdm", help="an SMDM (lit-gpt TransEncoder) .safetensors file -> a run directory")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--n-heads", type=int, default=None, help="attention heads (default: from SMDM's size grid)")
    s.add_argument("--tokenizer", default=None, help="tokenizer.json (SMDM uses Llama-2's; mask id = 32000)")
    s.add_argument("--max-seq-len", type=int, default=2048)
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.cmd == "from-llada":
            final = import_llada(args.src, Path(args.dst), dtype=dtype, tokenizer=args.tokenizer)
        else:
            final = import_smdm(args.src, Path(args.dst), n_heads=args.n_heads, tokenizer=args.tokenizer,
                                dtype=dtype, max_seq_len=args.max_seq_len)
    except (Unsupported, ConvertError, FileNotFoundError) as e:
        sys.exit(f"convert error: {e}")
    m = load_run_config(args.dst).model
    print(f"wrote {final} ({m.n_layers} layers, dim {m.dim}, vocab {m.vocab_size}, mask id {m.mask_id}); "
          f"evaluate with python -m eval.ppl --ckpt {args.dst}, continue pretraining with train.init_from={args.dst}")


if __name__ == "__main__":
    main()
