"""python -m pretrain --config configs/X.yaml [key.sub=value ...]"""
import argparse
import sys

from .config import ConfigError, load_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description="Pretrain a masked diffusion LM.")
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.n_layers=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    from data.shards import DataError
    from .train import train
    try:
        train(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except DataError as e:  # missing/inconsistent data, empty corpus, offline hub, ...: the message says what to do
        sys.exit(f"data error: {e}")


if __name__ == "__main__":
    main()
