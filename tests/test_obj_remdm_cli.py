"""ReMDM and GenMD4 through the user-facing commands: eval.generate --sampler remdm, the same keys as lm-eval model
arguments, and a genmd4 run directory through eval.load, eval.generate and eval.unmask_order."""
import pytest
import torch

from eval.generate import main as generate_main
from helpers_downstream import make_text_run, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_text_run(tmp_path_factory.mktemp("remdm") / "run", seq_len=32)


@pytest.fixture(scope="module")
def genmd4_run(tmp_path_factory):
    """A text run directory whose config says genmd4, with exponents spread from 0.2 to 3 over the vocabulary."""
    from safetensors.torch import load_file, save_file

    from pretrain.config import load_run_config, save_config
    run = make_text_run(tmp_path_factory.mktemp("genmd4") / "run", seq_len=32)
    cfg = load_run_config(run)
    cfg.diffusion.objective = "genmd4"
    save_config(cfg, run / "config.yaml")
    state = load_file(str(run / "model.safetensors"))
    w = torch.linspace(0.2, 3.0, cfg.model.vocab_size)
    state["noise_schedule.w_hat"] = torch.log(torch.expm1(w))  # softplus^{-1}
    save_file(state, str(run / "model.safetensors"))
    return run


@pytest.mark.parametrize("strategy", ["cap", "rescale", "conf", "loop"])
def test_generate_cli_remdm(run_dir, capsys, strategy):
    rc = generate_main(["--ckpt", str(run_dir), "--prompt", "the cat", "--gen-length", "8", "--steps", "16",
                        "--sampler", "remdm", "--remdm-strategy", strategy, "--eta", "0.05", "--top-p", "0.9",
                        "--temperature", "1.0", "--device", "cpu"])
    assert rc == 0
    assert "the cat" in capsys.readouterr().out


def test_lm_eval_model_args_for_remdm(run_dir):
    pytest.importorskip("lm_eval")
    import eval.lm_eval_model as m

    class Req:
        def __init__(self, args, doc_id):
            self.args, self.task_name, self.doc_id = args, "t", doc_id
    lm = m.UnmaskLM(ckpt=str(run_dir), device="cpu", sampler="remdm", remdm_strategy="loop", eta=0.05, top_p=0.95,
                    block_length=4, temperature=1.0)
    assert (lm.remdm.strategy, lm.remdm.eta, lm.remdm.top_p) == ("loop", 0.05, 0.95)
    opts = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True}
    reqs = [Req((c, opts), i) for i, c in enumerate(["the cat", "to be or not to be"])]
    texts = lm.generate_until(reqs, disable_tqdm=True)
    assert len(texts) == 2
    (alone,) = lm.generate_until([reqs[1]], disable_tqdm=True)
    assert alone == texts[1]  # per-request generators: a row does not depend on its batch
    with pytest.raises(ValueError, match="remdm strategy"):
        m.UnmaskLM(ckpt=str(run_dir), device="cpu", sampler="remdm", remdm_strategy="sometimes")
    with pytest.raises(ValueError, match="top_p"):
        m.UnmaskLM(ckpt=str(run_dir), device="cpu", sampler="remdm", top_p=0.0)


def test_genmd4_run_loads_generates_and_lists_its_unmasking_order(genmd4_run, capsys):
    from eval.load import load
    from eval.unmask_order import main as order_main
    run = load(genmd4_run)
    w = run.objective.exponents()
    assert torch.allclose(w, torch.linspace(0.2, 3.0, w.numel()), atol=1e-5)
    for sampler in ("mdlm", "remdm"):
        assert generate_main(["--ckpt", str(genmd4_run), "--gen-length", "8", "--steps", "8", "--sampler", sampler,
                              "--temperature", "1.0", "--device", "cpu"]) == 0
    capsys.readouterr()
    order_main([str(genmd4_run), "-k", "3"])
    out = capsys.readouterr().out
    first = out.split("unmask first")[1].split("unmask last")[0].splitlines()[1:]
    last = out.split("unmask last")[1].splitlines()[1:]
    assert len(first) == len(last) == 3
    assert first[0].split()[0] == "3.000"  # the largest exponent: the last token id
    assert last[0].split()[0] == "0.200" and "endoftext" in last[0]  # id 0; the mask id (1) is not listed


def test_end_of_training_samples_are_scored_by_the_true_language():
    """The trainer's closing samples (pretrain.loop.train.sample_and_show) print, next to each sample, its NLL
    under the true language against the entropy, its unigram entropy against real samples', and the valid rate."""
    import contextlib
    from pathlib import Path

    from data import build_data
    from model import Transformer
    from model.objectives import build_objective
    from pretrain.config import load_config
    from pretrain.loop.train import SHOW_SAMPLER_NAME, resolve_model, sample_and_show
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs" / "tiny.yaml"),
                      ["train.samples=2", "train.sample_steps=8", "data.seq_len=16"])
    data = build_data(cfg.data, 0)
    resolve_model(cfg, data)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    lines: list[str] = []
    objective = build_objective(cfg.diffusion, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size)
    rows = sample_and_show(model, cfg, data, torch.device("cpu"), contextlib.nullcontext(), lines.append, objective)
    assert len(rows) == 2 and all(len(r) == 16 and cfg.model.mask_id not in r for r in rows)
    assert SHOW_SAMPLER_NAME in lines[0]
    H = data.info["language"].entropy_per_token(16)
    assert f"H = {H:.3f}" in lines[1]
    assert len(lines) == 4
    for line in lines[2:]:
        assert f"vs H {H:.3f}" in line and "unigram H" in line and "valid transitions" in line


def test_bigram_tv_of_the_oracle_scores_errors_and_mode_collapse():
    """MarkovLanguage.score's bigram_tv: real samples sit at a floor that shrinks with their number; a sample
    repeating a two-word cycle, and one with forbidden transitions, sit far above it."""
    import numpy as np

    from data.synthetic import MarkovLanguage
    lang = MarkovLanguage(16, 3, 0.5, seed=2)
    none = lambda n: np.zeros((n, 0), dtype=np.int64)  # noqa: E731
    floors = [lang.score(none(n), lang.sample(np.random.default_rng(0).random((n, 32))))["bigram_tv"]
              for n in (16, 256)]
    assert floors[1] < floors[0] < 0.35
    a = int(np.argmax(lang.pi))
    b = int(np.argmax(lang.P[a]))
    path = [a]  # follow the likeliest successor until it loops: a valid, repetitive sample
    while path.count(path[-1]) < 2:
        path.append(int(np.argmax(lang.P[path[-1]])))
    loop = path[path.index(path[-1]):-1]
    cycle = np.array([(loop * 32)[:32]] * 16)
    looped = lang.score(none(16), cycle)
    assert looped["valid"] == 1.0 and looped["bigram_tv"] > 0.5
    truth = lang.sample(np.random.default_rng(1).random((256, 32)))
    broken = truth.copy()
    broken[:, 1::2] = lang.num_symbols  # half the pairs involve a non-symbol (the mask id)
    assert lang.score(none(256), broken)["bigram_tv"] >= 0.9
    pair = np.array([[a, b]])
    one = lang.score(none(1), pair)["bigram_tv"]
    assert one == pytest.approx(1.0 - lang.pi[a] * lang.P[a, b])
