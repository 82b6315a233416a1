"""python -m model NAME [NAME ...]: parameter counts and shapes of named configs (built on the meta device)."""
import argparse

import torch

from .config import PRESETS, get_preset
from .params import count_params
from .transformer import Transformer


def describe(name: str) -> str:
    cfg = get_preset(name)
    if cfg.vocab_size is None:
        cfg.vocab_size = 256
    with torch.device("meta"):
        counts = count_params(Transformer(cfg))
    vocab = f"{cfg.vocab_size}" + (" (tiny: vocab from data, 256 shown)" if name == "tiny" else "")
    return (f"{name}: total {counts['total']:,} ({counts['total'] / 1e9:.2f}B)  non-embedding "
            f"{counts['non_embedding']:,} ({counts['non_embedding'] / 1e9:.2f}B)  embedding {counts['embedding']:,}\n"
            f"  layers {cfg.n_layers}  d_model {cfg.dim}  heads {cfg.n_heads}  kv heads {cfg.kv_heads}  "
            f"ffn {cfg.ffn_dim}  vocab {vocab}  rope theta {cfg.rope_theta:g}  max len {cfg.max_seq_len}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"config names (default: all): {', '.join(PRESETS)}")
    args = parser.parse_args()
    for name in args.names or PRESETS:
        print(describe(name))


if __name__ == "__main__":
    main()
