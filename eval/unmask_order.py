"""The tokens a GenMD4 checkpoint unmasks first and last (its learned per-token exponents w_v), like the list in
the GenMD4 paper:

    python -m eval.unmask_order runs/NAME [-k 20]
"""
from __future__ import annotations

from eval.load import load
from model.objectives.genmd4 import exponents_module, unmask_order


def main(argv=None) -> None:
    """python -m eval.unmask_order RUN_OR_CHECKPOINT [-k 20]: the tokens GenMD4 unmasks first and last."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("-k", type=int, default=20)
    args = ap.parse_args(argv)
    loaded = load(args.ckpt)
    if loaded.cfg.diffusion.objective != "genmd4":
        raise SystemExit(f"{args.ckpt} was trained with diffusion.objective={loaded.cfg.diffusion.objective}: only genmd4 learns per-token schedules")
    module = exponents_module(loaded.model)
    tok = loaded.tokenizer
    first, last = unmask_order(module(), tok.decode, args.k, mask_id=tok.mask_id,
                               n_real=getattr(tok, "vocab_size", None))
    w = module().detach()
    n_real = getattr(tok, "vocab_size", None) or w.numel()
    w = w[[i for i in range(min(n_real, w.numel())) if i != tok.mask_id]]  # real tokens only
    print(f"w over {w.numel()} tokens: min {float(w.min()):.3f} mean {float(w.mean()):.3f} max {float(w.max()):.3f} "
          f"std {float(w.std()):.3f}")
    print("unmask first (largest w):")
    for s, v in first:
        print(f"  {v:7.3f}  {s}")
    print("unmask last (smallest w):")
    for s, v in last:
        print(f"  {v:7.3f}  {s}")


if __name__ == "__main__":
    main()
