"""python -m pretrain --config configs/X.yaml [key.sub=value ...]"""
import argparse
import sys

from .config import ConfigError, load_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description="Pretrain a masked diffusion LM.")
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--rollback", type=int, metavar="STEP", help="resume from this run's checkpoint of STEP; "
                        "newer checkpoints move to checkpoints/abandoned-<time>/ (train.resume=<that path>)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.n_layers=4")
    args = parser.parse_intermixed_args(argv)  # options may come after overrides (--rollback N)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.rollback is not None:
            from pathlib import Path
            from .checkpoint.resume import rollback_path
            cfg.train.resume = str(rollback_path(Path(cfg.train.out_dir) / cfg.train.name, args.rollback))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    from data.shards import DataError
    from .checkpoint.store import CheckpointError
    from .loop.guard import TooManyBadSteps
    from .loop.train import train
    try:
        train(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except CheckpointError as e:  # a failed save or an unloadable checkpoint: what is on disk, and what to do
        sys.exit(f"checkpoint error: {e}")
    except TooManyBadSteps as e:
        sys.exit(f"training stopped: {e}")
    except DataError as e:  # missing/inconsistent data, empty corpus, offline hub, ...: the message says what to do
        sys.exit(f"data error: {e}")


if __name__ == "__main__":
    main()
