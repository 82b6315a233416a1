"""sedd, d3pm and dfm in the tools around the trainer: launch.sweep plans them (adaLN set, one run name per
graph / source), launch.plan counts their adaLN weights and per-row loss, the config validates before the data
names the mask id, the GPU recipes configs/owt-{sedd,d3pm,dfm}.yaml load, and the lm-eval model serves
loglikelihood_rolling through eval.elbo with the objective's own estimator and refuses loglikelihood (the
masked-answer estimator is not their bound) with a message instead of a wrong number."""
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launch import sweep
from tests.test_sweep import _spec, words  # noqa: F401  (words: the module's prepared-data fixture)

BASELINES = ["sedd", "d3pm", "dfm"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_sweep_plans_each_baseline_with_adaln_and_distinct_names(words, tmp_path):  # noqa: F811
    spec = _spec(words, tmp_path, sizes=[{"name": "a", "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32}],
                 budgets=[6e8], unique_tokens=[0],
                 objectives=["sedd", {"name": "sedd", "overrides": {"diffusion.graph": "uniform"}},
                             {"name": "d3pm", "overrides": {"diffusion.d3pm_steps": 50}},
                             {"name": "dfm", "overrides": {"diffusion.source": "uniform"}}])
    plans = sweep.make_plan(spec)
    assert [p.name for p in plans] == ["a-sedd-C6e8-s0", "a-sedd-uniform-C6e8-s0", "a-d3pm-C6e8-s0",
                                       "a-dfm-uniform-C6e8-s0"]
    for p in plans:
        assert p.config["model"]["time_conditioning"] == "adaln" and p.config["model"]["causal"] is False
        assert p.steps > 0
    assert plans[1].config["diffusion"]["graph"] == "uniform"


def test_config_validates_before_the_data_names_the_mask():
    """configs/tiny.yaml resolves model.mask_id from the synthetic language after validation: sedd (absorb) and
    dfm (mask source) must not refuse the unresolved id; a mask id outside the vocabulary is refused."""
    from model.objectives import DiffusionConfig, build_objective
    from pretrain.config import ConfigError, load_config
    for over in (["diffusion.objective=sedd"], ["diffusion.objective=d3pm"], ["diffusion.objective=dfm"]):
        load_config(str(CONFIGS / "tiny.yaml"), over + ["model.time_conditioning=adaln"])
    with pytest.raises(ConfigError, match="time_conditioning=adaln"):
        load_config(str(CONFIGS / "tiny.yaml"), ["diffusion.objective=sedd"])
    with pytest.raises(ValueError, match="model.mask_id=9 is not below model.vocab_size=5"):
        build_objective(DiffusionConfig(objective="sedd"), mask_id=9, vocab_size=5)
    obj = build_objective(DiffusionConfig(objective="dfm"), mask_id=None, vocab_size=5)
    with pytest.raises(ValueError, match="masking needs a mask token"):
        obj.noise(torch.zeros(1, 4, dtype=torch.long), obj.draw(0, 0, 1, 4))


@pytest.mark.parametrize("name", BASELINES)
def test_gpu_recipes_load(name):
    from pretrain.config import load_config
    cfg = load_config(str(CONFIGS / f"owt-{name}.yaml"), [])
    assert cfg.diffusion.objective == name and cfg.model.time_conditioning == "adaln"
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.data.seq_len) == (768, 12, 12, 1024)
    assert cfg.train.global_batch_size == 512


def test_plan_counts_adaln_and_the_row_loss():
    from launch.plan import Layout, plan
    from model.config import get_preset
    from model.objectives import DiffusionConfig
    from model.objectives.config import GenMD4Config
    mcfg = dataclasses.replace(get_preset("tiny"), vocab_size=65, mask_id=64)
    kw = dict(seq_len=64, global_batch=1, micro=1, ac="none", ac_every=2, ce_chunk=4096)
    one = Layout(1, 1, 1, 1)
    base = plan(mcfg, one, **kw)
    d, V, rows = mcfg.dim, 65, 64
    assert base["ce_head"] == rows * 2 * d + rows * 10 * V  # the masked CE: 10 bytes per logit
    for name, per_logit, dcfg in [("sedd", 20, None), ("dfm", 16, None), ("d3pm", 41, None),
                                  ("d3pm", 16, DiffusionConfig(objective="d3pm", graph="absorb")),
                                  ("d3pm", 41, DiffusionConfig(objective="d3pm", graph="uniform"))]:
        p = plan(mcfg, one, objective=name, diffusion=dcfg, **kw)
        assert p["exact"]["params"] > base["exact"]["params"], name  # the adaLN weights are counted
        assert p["ce_head"] == rows * 2 * d * 2 + rows * per_logit * V, (name, dcfg)
    with pytest.raises(ValueError, match="unknown --objective 'sed'"):
        plan(mcfg, one, objective="sed", **kw)
    # genmd4 without a config: the default (2 masks per t, two network passes), not one pass
    two, again, once = (plan(mcfg, one, objective="genmd4", diffusion=dcfg, **kw) for dcfg in
                        (None, DiffusionConfig(objective="genmd4"),
                         DiffusionConfig(objective="genmd4", genmd4=GenMD4Config(samples_per_t=1))))
    assert two == again and two != once


# ------------------------------------------------------------------------------------------ the lm-eval model
def _request(*args):
    return SimpleNamespace(args=args, task_name=None, doc_id=None)


@pytest.mark.parametrize("name,diffusion,method", [("sedd", {"objective": "sedd"}, "t"),
                                                   ("d3pm", {"objective": "d3pm", "d3pm_steps": 20}, "step"),
                                                   ("dfm", {"objective": "dfm", "source": "uniform"}, "elbo")])
def test_lm_eval_model_rolling_uses_the_objectives_estimator_and_refuses_conditionals(tmp_path, name, diffusion,
                                                                                     method):
    pytest.importorskip("lm_eval")
    from eval.elbo import rolling_nelbo
    from eval.lm_eval_model import UnmaskLM
    from tests.helpers_downstream import make_text_run
    torch.set_num_threads(1)
    run = make_text_run(tmp_path / name, seq_len=16, diffusion=diffusion)
    lm = UnmaskLM(ckpt=str(run), rolling_samples=2, seed=3, batch_size=8)
    assert lm.rolling_method == method
    text = "the cat sat on the mat and the dog sat on the log"
    got = lm.loglikelihood_rolling([_request(text)])[0]
    obj = lm.run.objective
    want = rolling_nelbo(lm.model, lm.tok.encode(text), mask_id=lm.mask_id, window=lm.max_length, samples=2, seed=3,
                         bos_id=lm.prefix_id, method=method, batch_size=8, objective=obj)
    assert math.isfinite(got) and got < 0 and got == pytest.approx(-want.total_nats, rel=1e-9)
    with pytest.raises(ValueError, match=f"not a bound for diffusion.objective={name}"):
        lm.loglikelihood([_request("the cat sat on the", " mat")])
    with pytest.raises(ValueError, match="does not fit objective"):
        UnmaskLM(ckpt=str(run), rolling_method="count")


def test_lm_eval_model_serves_a_block_checkpoint(tmp_path):
    """Block diffusion: loglikelihood_rolling is the block bound (eval.elbo with the objective), and loglikelihood
    the block conditional bound with only the answer scored (eval.likelihood with the objective), not the
    masked-answer estimator over plain bidirectional attention, which gives another number."""
    pytest.importorskip("lm_eval")
    from eval.elbo import rolling_nelbo
    from eval.likelihood import conditional_loglikelihood
    from eval.lm_eval_model import UnmaskLM
    from tests.helpers_downstream import make_text_run
    torch.set_num_threads(1)
    run = make_text_run(tmp_path / "block", seq_len=16, diffusion={"objective": "block", "block_size": 4})
    lm = UnmaskLM(ckpt=str(run), rolling_samples=2, seed=3, batch_size=8, mc_samples=8)
    text = "the cat sat on the mat and the dog sat on the log"
    got = lm.loglikelihood_rolling([_request(text)])[0]
    obj = lm.run.objective
    want = rolling_nelbo(lm.model, lm.tok.encode(text), mask_id=lm.mask_id, window=lm.max_length, samples=2, seed=3,
                         bos_id=lm.prefix_id, method=lm.rolling_method, batch_size=8, objective=obj)
    assert obj.name == "block"
    assert math.isfinite(got) and got < 0 and got == pytest.approx(-want.total_nats, rel=1e-9)
    ll, _ = lm.loglikelihood([_request("the cat sat on the", " mat and the dog")])[0]
    c, x = lm._encode_pair("the cat sat on the", " mat and the dog")
    common = dict(mask_id=lm.mask_id, mc_samples=8, batch_size=8, seed=3, max_length=lm.max_length)
    assert ll == pytest.approx(conditional_loglikelihood(lm.model, [c], [x], objective=obj, **common)[0].logprob,
                               rel=1e-9)
    assert ll != pytest.approx(conditional_loglikelihood(lm.model, [c], [x], **common)[0].logprob, rel=1e-6)
