"""python -m model NAME [NAME ...] [--seq L]: parameter counts, shapes and training FLOPs/token by term of named
configs (built on the meta device).

FLOPs/token (forward + backward) are split into weights (6 N_nonembed), attention (12 n_layers d L, the full
L x L square) and the output head (6 d V); the head is shown at every position (AR) and at the mean masked
fraction (MDM, linear schedule, eps 1e-3: its loss needs logits only at masked positions)."""
import argparse

import torch

from .config import PRESETS, get_preset
from .params import count_params, flops_by_term
from .transformer import Transformer

_MDM_HEAD = (1 - 1e-3) / 2 + 1e-3  # mean masked fraction of the linear schedule with eps = 1e-3


def describe(name: str, seq_len: int = 0) -> str:
    cfg = get_preset(name)
    if cfg.vocab_size is None:
        cfg.vocab_size = 256
    with torch.device("meta"):
        counts = count_params(Transformer(cfg))
    vocab = f"{cfg.vocab_size}" + (" (tiny: vocab from data, 256 shown)" if name == "tiny" else "")
    L = seq_len or cfg.max_seq_len
    ar = flops_by_term(cfg, L, counts["non_embedding"])
    mdm = flops_by_term(cfg, L, counts["non_embedding"], head_fraction=_MDM_HEAD)
    return (f"{name}: total {counts['total']:,} ({counts['total'] / 1e9:.2f}B)  non-embedding "
            f"{counts['non_embedding']:,} ({counts['non_embedding'] / 1e9:.2f}B)  embedding {counts['embedding']:,}\n"
            f"  layers {cfg.n_layers}  d_model {cfg.dim}  heads {cfg.n_heads}  kv heads {cfg.kv_heads}  "
            f"ffn {cfg.ffn_dim}  vocab {vocab}  rope theta {cfg.rope_theta:g}  max len {cfg.max_seq_len}\n"
            f"  training FLOPs/token at seq {L}: weights {ar['weights']:.4g} + attention {ar['attention']:.4g} + "
            f"head {ar['head']:.4g} (AR, every position) = {ar['total']:.4g};  MDM (head at masked positions, "
            f"{_MDM_HEAD:.4f} of them): head {mdm['head']:.4g}, total {mdm['total']:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"config names (default: all): {', '.join(PRESETS)}")
    parser.add_argument("--seq", type=int, default=0, help="sequence length for FLOPs/token (default: the "
                        "config's max length)")
    args = parser.parse_args()
    if args.seq < 0:
        parser.error("--seq must be positive")
    for name in args.names or PRESETS:
        try:
            print(describe(name, args.seq))
        except ValueError as e:  # unknown preset: the message lists the choices
            parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
