"""What the trainer and the evaluators need from a corpus, whatever produced it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch


class SampleSource(Protocol):
    """Fixed-length sequences addressed by index.

    `num_samples` is None for an endless source (the synthetic language), else the count of packed sequences.
    `get` returns tokens (B, L) int64 and document ids (B, L) int64, or None when every row is one document."""
    num_samples: Optional[int]
    seq_len: int

    def get(self, indices: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...


@dataclass
class DataBundle:
    train: SampleSource
    valid: dict[str, SampleSource]  # name -> held-out source; the first is the main validation set
    vocab_size: int  # tokenizer size including special tokens (mask, eos, ...)
    mask_id: int
    eos_id: Optional[int]
    decode: Callable[[list[int]], str]
    description: str
    true_entropy: Optional[float] = None  # nats per token at seq_len, when the corpus knows it exactly
    info: dict = field(default_factory=dict)  # anything worth saving with the run (tokenizer fingerprint, ...)
    encode: Optional[Callable[[str], list[int]]] = None
