"""Prepare a run's data once, before the job: one process, no process group.

    python -m launch.prepare_data --config configs/X.yaml [key.sub=value ...]

Training prepares `data.sources[0]` on first use too (rank 0 prepares, the other ranks wait on the folder's
meta.json, not in a collective), but a large corpus is best prepared before the GPUs are allocated; the slurm
template (python -m launch.slurm) runs this on one node before starting torchrun.
"""
from __future__ import annotations

import argparse
from typing import Optional


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.prepare_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from pretrain.config import load_config
    cfg = load_config(args.config, args.overrides)
    if cfg.data.kind != "prepared" or cfg.data.prepare is None:
        print(f"{args.config}: nothing to prepare (data.kind={cfg.data.kind}"
              f"{', no data.prepare section' if cfg.data.kind == 'prepared' else ''})")
        return
    from data.prepared import ensure_prepared
    ensure_prepared(cfg.data)
    print(f"prepared {cfg.data.sources[0].path}")


if __name__ == "__main__":
    main()
