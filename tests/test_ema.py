"""EMA of the weights (train.ema_decay): the update rule, no update on a skipped step, and a checkpointed EMA that
resumes at another data-parallel degree exactly like an uninterrupted single-process run (gloo)."""
import subprocess
import sys

import pytest
import torch

from dist_launch import ROOT, env
from model import ModelConfig, Transformer
from pretrain.checkpoint.ema import EMA
from pretrain.checkpoint.weights import load_ema_weights


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=11, mask_id=10,
                                   max_seq_len=8))


def test_update_rule_and_mdlm_warmup():
    m = _tiny_model()
    ema = EMA(m, decay=0.9)
    name, p = next(iter(m.named_parameters()))
    start = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    ema.update()  # n = 1: decay min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow[name], d * start + (1 - d) * (start + 1), atol=1e-6)
    for _ in range(200):
        ema.update()
    assert ema.current_decay() == 0.9 and ema.updates == 201


def test_swapped_evaluates_the_ema_and_restores_the_weights():
    m = _tiny_model()
    ema = EMA(m, decay=0.9)
    raw = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for s in ema.shadow.values():
            s.add_(0.5)
    x = torch.randint(0, 10, (2, 8))
    with ema.swapped():
        for n, p in m.named_parameters():
            assert torch.equal(p, raw[n] + 0.5)
        inside = m(x)
    for n, p in m.named_parameters():
        assert torch.equal(p, raw[n])
    assert not torch.allclose(inside, m(x))


class _SkipAll:
    def verdict(self, loss, grad_norm):
        return "test: skipped"


def test_skipped_step_leaves_the_ema_alone():
    from pretrain.checkpoint.store import Checkpointer
    from pretrain.config import load_config
    from model.objectives import build_objective
    from pretrain.engines.native import NativeEngine
    from pretrain.engines.parallel import ParallelDims
    from pretrain.loop.step import train_step
    from pretrain.loop.train import build_optimizer
    from data import build_data
    cfg = load_config("configs/tiny.yaml", ["data.seq_len=16", "train.global_batch_size=2"])
    data = build_data(cfg.data, 0)
    from pretrain.loop.train import resolve_model
    resolve_model(cfg, data)
    model = Transformer(cfg.model)
    engine = NativeEngine(model, build_optimizer(model, cfg.optim), grad_clip=1.0, accum=1,
                          checkpointer=Checkpointer(ROOT / "runs" / "unused-ema-test"))
    engine.attach_ema(0.5)
    from data import Loader
    loader = Loader(data.train, 0, 0, 1)
    kw = dict(step=0, consumed=0, micro=2, accum=1, dims=ParallelDims.from_config(cfg.parallel, 1), device=torch.device("cpu"),
              objective=build_objective(cfg.diffusion, mask_id=cfg.model.mask_id))
    before = {k: v.clone() for k, v in engine.ema.shadow.items()}
    res = train_step(engine, cfg, loader, guard=_SkipAll(), ema=engine.ema, **kw)
    assert res.skipped and engine.ema.updates == 0
    assert all(torch.equal(before[k], engine.ema.shadow[k]) for k in before)
    res = train_step(engine, cfg, loader, ema=engine.ema, **kw)
    assert not res.skipped and engine.ema.updates == 1
    assert any(not torch.equal(before[k], engine.ema.shadow[k]) for k in before)


def _args(out, name, *extra):
    return [f"train.out_dir={out}", f"train.name={name}", "train.steps=6", "train.save_every=3", "train.eval_every=100",
            "train.samples=0", "train.ema_decay=0.8", "logging.progress_bar=false", "logging.plot=false",
            "data.seq_len=32", *extra]


def _train(out, name, nproc, *extra):
    if nproc == 1:  # in this process: no interpreter start-up
        from pretrain.config import load_config
        from pretrain.loop.train import train
        train(load_config("configs/tiny.yaml", _args(out, name, *extra)))
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "pretrain", "--config", "configs/tiny.yaml", *_args(out, name, *extra)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]


def _ema_of(ckpt):
    from eval.load import load
    got = load(ckpt)
    assert got.weights == "ema"
    raw = load(ckpt, ema=False)
    return {k: v.clone() for k, v in got.model.state_dict().items()}, raw.model.state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema_runs")
    _train(out, "ref", 1)  # 6 steps, one process, never stopped
    _train(out, "split", 2, "train.stop_after=3")  # FSDP over 2 ranks, stops (and saves) at step 3
    _train(out, "split", 1)  # resumed in one process: the EMA is resharded from 2 ranks to 1
    return out


def test_ema_survives_resume_at_another_dp_degree(runs):
    from pretrain.checkpoint.store import latest_checkpoint, read_trainer_state
    for step in (3, 6):
        ref, ref_raw = _ema_of(runs / "ref" / "checkpoints" / f"step_{step:08d}")
        got, _ = _ema_of(runs / "split" / "checkpoints" / f"step_{step:08d}")
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-5), (step, k, (got[k] - ref[k]).abs().max())
        assert any(not torch.allclose(ref[k], ref_raw[k]) for k in ref)  # the EMA is not the trained weights
    state = read_trainer_state(latest_checkpoint(runs / "split" / "checkpoints"))
    assert state["ema_updates"] == 6 and state["ema_decay"] == 0.8
    assert read_trainer_state(runs / "split" / "checkpoints" / "step_00000003")["layout"]["dp_shard"] == 2


def test_checkpoint_without_ema_loads_raw(tmp_path):
    m = _tiny_model()
    assert load_ema_weights(tmp_path, m) is False
