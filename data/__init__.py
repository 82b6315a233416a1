"""Corpora to batches: the built-in synthetic language, prepared token shards, and the stateless loader."""
from .loader import Loader, permute
from .source import DataBundle, SampleSource


def build_data(cfg, seed: int) -> DataBundle:
    """cfg: pretrain.config.DataConfig."""
    if cfg.kind == "synthetic":
        from .synthetic import build_synthetic
        return build_synthetic(cfg, seed)
    if cfg.kind == "prepared":
        from .prepared import build_prepared
        return build_prepared(cfg, seed)
    raise ValueError(f"unknown data.kind {cfg.kind!r}; choices: synthetic, prepared")


__all__ = ["DataBundle", "Loader", "SampleSource", "build_data", "permute"]
