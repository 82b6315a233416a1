"""Consolidate a checkpoint (any parallel layout, either engine) into one folder for evaluation and sharing:

    python -m pretrain.export runs/NAME                    # latest checkpoint -> runs/NAME/export/
    python -m pretrain.export runs/NAME/checkpoints/step_00001000 --out /somewhere --dtype bf16

The folder holds model.safetensors (full, unsharded weights under the model's own parameter names),
config.yaml (the run's config, to rebuild the model) and the run's tokenizer files when it has them;
eval/load.py and `Transformer.load_state_dict` read it directly. Runs in one process on the CPU: DCP
reshards any saved layout into the single unsharded model; DeepSpeed checkpoints are reassembled with
DeepSpeed's zero_to_fp32. Peak memory is the fp32 model, twice.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from .checkpoint import STATE_FILE, export_safetensors, latest_checkpoint, read_trainer_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json")


def resolve(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) from either."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent.parent, path
    if (path / "config.yaml").is_file():
        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"{path} has no complete checkpoint under checkpoints/")
        return path, ckpt
    raise FileNotFoundError(f"{path} is neither a run directory (with config.yaml) nor a checkpoint (with {STATE_FILE})")


def export(path: Path, out: Optional[Path] = None, dtype: Optional[torch.dtype] = None) -> Path:
    from model import Transformer
    from pretrain.config import Config, from_dict
    run_dir, ckpt = resolve(path)
    state = read_trainer_state(ckpt)
    cfg_tree = state.get("config") or yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg = from_dict(Config, cfg_tree)
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a run directory (latest checkpoint) or a checkpoint directory")
    ap.add_argument("--out", default=None, help="output folder (default: <run>/export)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args(argv)
    try:
        out = export(Path(args.path), Path(args.out) if args.out else None,
                     torch.bfloat16 if args.dtype == "bf16" else None)
    except FileNotFoundError as e:
        sys.exit(f"export error: {e}")
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.yaml'}")


if __name__ == "__main__":
    main()
