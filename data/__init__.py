"""Corpora to batches: the built-in synthetic language, prepared token shards, and the stateless loader.

Modules import one way, bottom up: errors (DataError, paths, hub check) and dist (rank, world size); tokenizer,
megatron, source, loader; inputs, shards, synthetic; prepare, prepared, blend; this file (which dispatches on
the data kind)."""
from pathlib import Path

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


def load_run_tokenizer(run_dir, cfg):
    """The tokenizer a run trained with: its saved copy, or the synthetic language rebuilt from the config."""
    from .tokenizer import SymbolTokenizer, TextTokenizer
    run_dir = Path(run_dir)
    if (run_dir / "tokenizer.json").is_file():
        return TextTokenizer.load(run_dir)
    if cfg.data.kind == "synthetic":
        from .synthetic import MarkovLanguage
        s = cfg.data.synthetic
        tok = SymbolTokenizer(MarkovLanguage(s.num_symbols, s.branching, s.concentration, s.seed))
        imported = (run_dir / "imported_from.json").is_file()  # written by pretrain.interop.convert
        if imported and cfg.model.mask_id not in (None, tok.mask_id):  # e.g. SMDM (mask 32000) without a tokenizer
            raise FileNotFoundError(f"{run_dir} was imported without a tokenizer (its mask id is {cfg.model.mask_id}, "
                                    f"not a synthetic language's), so its text cannot be tokenized: rerun python -m "
                                    f"pretrain.interop.convert ... --tokenizer PATH/tokenizer.json")
        return tok
    raise FileNotFoundError(f"{run_dir} has no tokenizer.json; it is needed to tokenize evaluation text")


__all__ = ["DataBundle", "Loader", "SampleSource", "build_data", "load_run_tokenizer", "permute"]
