"""Small models and run directories for the generation / downstream tests (no training, no network)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from model import Transformer
from model.config import ModelConfig

ENGLISH = [
    "the cat sat on the mat and the dog sat on the log",
    "a quick brown fox jumps over the lazy dog near the river bank",
    "she sells sea shells by the sea shore every summer morning",
    "to be or not to be that is the question of the day",
    "the answer is yes and the other answer is no",
]


def tiny_model(vocab: int = 40, mask_id: int = 39, *, causal: bool = False, seed: int = 0, dim: int = 32,
               n_layers: int = 2, n_heads: int = 2, max_seq_len: int = 128, init_std: float = 0.3) -> Transformer:
    """Random weights with a large init so predictions are far from uniform (no near-ties between tokens,
    which would make exact comparisons depend on rounding)."""
    cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=2 * dim, vocab_size=vocab,
                      mask_id=mask_id, max_seq_len=max_seq_len, causal=causal, init_std=init_std)
    m = Transformer(cfg)
    m.init_weights(seed=seed)
    return m.eval()


def make_text_run(root: Path, *, causal: bool = False, seq_len: int = 96, seed: int = 0, vocab: int = 300,
                  diffusion: Optional[dict] = None) -> Path:
    """A run directory (config.yaml, tokenizer.json + meta, model.safetensors) with a byte-level BPE trained on
    a few sentences and a randomly initialised model: enough for eval.load and lm-eval end to end.
    diffusion: diffusion.* settings (e.g. {"objective": "sedd"}); a time-conditioned objective gets an adaLN
    model."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data.tokenizer import TextTokenizer
    from pretrain.config import Config, save_config

    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|mask|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(ENGLISH * 4, trainer)
    text_tok = TextTokenizer(tok, mask_id=tok.token_to_id("<|mask|>"), eos_id=tok.token_to_id("<|endoftext|>"))
    text_tok.save(run)
    cfg = Config()
    cfg.model = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=text_tok.vocab_size,
                            mask_id=text_tok.mask_id, max_seq_len=2 * seq_len, causal=causal, init_std=0.3)
    cfg.data.seq_len = seq_len
    if causal:
        cfg.diffusion.objective = "ar"
    for key, value in (diffusion or {}).items():
        setattr(cfg.diffusion, key, value)
    from model.objectives import OBJECTIVES
    if OBJECTIVES[cfg.diffusion.objective].time_conditioning:
        cfg.model.time_conditioning = "adaln"
    save_config(cfg, run / "config.yaml")
    model = Transformer(cfg.model)
    model.init_weights(seed=seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    return run


def masks_per_step(model, **kw) -> list[list[int]]:
    """Masked-token counts of the generated region, per row, after every sampler step."""
    from model.sample import generate
    counts = []

    def cb(step, x):
        counts.append((x[:, -kw["gen_length"]:] == kw["mask_id"]).sum(1).tolist())
    generate(model, callback=cb, **kw)
    return counts


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one_thread():
    """Generator for a module-scoped autouse fixture: these tests run tiny matmuls, where torch's intra-op
    threads only add synchronisation, and on a shared 2-core machine spinning threads make them ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
