"""No device-to-host synchronisation inside the training step's micro-batch loop.

On an accelerator these ops wait for the device (torch.cuda.set_sync_debug_mode flags them): reading a value
(`.item()`, `.tolist()`, `bool(t)`: aten._local_scalar_dense), data-dependent shapes (nonzero, masked_select,
boolean indexing, unique, repeat_interleave with a tensor count). On the CPU nothing waits, so this test counts
the same ops with a dispatch mode while the device-side work of each micro-batch runs (the objective's loss:
network forward, head and loss; and the backward). The host-side noising between them is free to use them: it
works on host copies before the transfer."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data import Loader, build_data
from model import Transformer
from model.objectives import build_objective
from pretrain.config import load_config
from pretrain.engines.native import NativeEngine
from pretrain.engines.parallel import ParallelDims
from pretrain.loop import step as step_mod
from pretrain.loop.train import build_optimizer, resolve_model

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.on, self.inside, self.outside = False, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        if func in SYNCING or bool_index:
            (self.inside if self.on else self.outside).append(str(func))
        return func(*args, **kwargs)


class PackedLoader:
    """The real loader, with two documents per row (so the attention mask path runs)."""

    def __init__(self, loader):
        self.loader = loader

    def rank_positions(self, *a):
        return self.loader.rank_positions(*a)

    def micro_batch(self, *a):
        x0, _ = self.loader.micro_batch(*a)
        doc = torch.zeros_like(x0)
        doc[:, x0.shape[1] // 3:] = 1
        return x0, doc


@pytest.mark.parametrize("objective,extra", [("mdm", []), ("ar", ["diffusion.objective=ar", "model.causal=true"])])
def test_no_sync_inside_the_micro_batch_loop(objective, extra, monkeypatch):
    cfg = load_config("configs/tiny.yaml", ["data.seq_len=32", "train.global_batch_size=4",
                                            "train.micro_batch_size=2", "data.random_length_prob=1.0", *extra])
    data = build_data(cfg.data, 0)
    resolve_model(cfg, data)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    from pretrain.checkpoint.store import Checkpointer
    engine = NativeEngine(model, build_optimizer(model, cfg.optim), grad_clip=1.0, accum=2,
                          checkpointer=Checkpointer("runs/unused-sync-test"))
    counter = SyncCounter()

    @contextlib.contextmanager
    def device_side():
        counter.on = True
        try:
            yield
        finally:
            counter.on = False

    real_loss, real_backward = step_mod.objective_loss, engine.backward

    def loss(*a, **k):
        with device_side():
            return real_loss(*a, **k)

    def backward(*a, **k):
        with device_side():
            return real_backward(*a, **k)
    monkeypatch.setattr(step_mod, "objective_loss", loss)
    engine.backward = backward
    obj = build_objective(cfg.diffusion, mask_id=cfg.model.mask_id)
    with counter:
        res = step_mod.train_step(engine, cfg, PackedLoader(Loader(data.train, 0, 0, 1)), step=3, consumed=0,
                                  micro=2, accum=2, dims=ParallelDims.from_config(cfg.parallel, 1),
                                  device=torch.device("cpu"), objective=obj)
    assert torch.isfinite(res.loss)
    assert counter.inside == [], f"device syncs inside the micro-batch loop: {counter.inside}"


def test_the_counter_sees_a_sync_in_the_loss(monkeypatch):
    """Power check: the old boolean-mask path (logits at a device-side bool mask) is counted."""
    cfg = load_config("configs/tiny.yaml", ["data.seq_len=16"])
    cfg.model.vocab_size, cfg.model.mask_id = 20, 19
    model = Transformer(cfg.model)
    x = torch.randint(0, 19, (2, 16))
    counter = SyncCounter()
    with counter:
        counter.on = True
        model(x, logits_at=x > 5, targets=x[x > 5])
    assert any("index" in f or "nonzero" in f for f in counter.inside)
