"""lm-eval end to end with the `unmask` model on tiny local tasks written here (no network)."""
import json
import os
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from eval.likelihood import conditional_loglikelihood, encode_pair, greedy_match  # noqa: E402
from eval.load import load  # noqa: E402
from helpers_downstream import make_text_run, one_thread  # noqa: E402

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

LAMBADA_LIKE = ["the cat sat on the mat", "she sells sea shells by the shore", "to be or not to be",
                "the answer is yes and the other answer is no"]
CHOICES = [  # multiple choice with single-word answers
    {"q": "the cat sat on the", "choices": [" mat", " dog"], "label": 0},
    {"q": "a quick brown", "choices": [" fox", " sea"], "label": 0},
    {"q": "to be or not to", "choices": [" day", " be"], "label": 1},
]


def write_tasks(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    (data / "lam.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_LIKE))
    (data / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CHOICES))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_lambada.yaml").write_text(
        "task: tiny_lambada\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {data / 'lam.jsonl'}\n"
        "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {data / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{q}}\"\ndoc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {data / 'lam.jsonl'}\n"
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {data / 'lam.jsonl'}\n"
        "output_type: generate_until\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_text_run(tmp_path_factory.mktemp("lmeval") / "run", seq_len=64)


def test_lm_eval_end_to_end_local_tasks(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import eval.lm_eval_model  # noqa: F401  (registers "unmask")
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path / "tasks", tmp_path)
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model="unmask", model_args=f"ckpt={run_dir},mc_samples=4,seed=5",
                                  tasks=["tiny_lambada", "tiny_mc", "tiny_rolling", "tiny_gen"], task_manager=tm,
                                  batch_size=8, bootstrap_iters=0)
    res = out["results"]

    run = load(run_dir)
    tok, model, mask = run.tokenizer, run.model, run.cfg.model.mask_id
    # LAMBADA-style acc is is_greedy: greedy joint decoding by iterative unmasking (deterministic)
    pairs = [encode_pair(tok, " ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1], tok.eos_id) for t in LAMBADA_LIKE]
    want_acc = sum(greedy_match(model, [c for c, _ in pairs], [x for _, x in pairs], mask_id=mask)) / len(pairs)
    assert res["tiny_lambada"]["acc,none"] == pytest.approx(want_acc)
    # its perplexity metric is exp(-mean loglik): same seed, same noise, same numbers
    lls = conditional_loglikelihood(model, [c for c, _ in pairs], [x for _, x in pairs], mask_id=mask,
                                    mc_samples=4, seed=5, max_length=64)
    want_ppl = math.exp(-sum(r.logprob for r in lls) / len(lls))
    assert res["tiny_lambada"]["perplexity,none"] == pytest.approx(want_ppl, rel=1e-4)
    # multiple choice: acc from comparing the choices' log-likelihoods
    mc_pairs = [[encode_pair(tok, d["q"], c, tok.eos_id) for c in d["choices"]] for d in CHOICES]
    flat = [p for ps in mc_pairs for p in ps]
    mc_ll = conditional_loglikelihood(model, [c for c, _ in flat], [x for _, x in flat], mask_id=mask,
                                      mc_samples=4, seed=5, max_length=64)
    scores = [[mc_ll[2 * i].logprob, mc_ll[2 * i + 1].logprob] for i in range(len(CHOICES))]
    want_mc = sum(int(s.index(max(s)) == d["label"]) for s, d in zip(scores, CHOICES)) / len(CHOICES)
    assert res["tiny_mc"]["acc,none"] == pytest.approx(want_mc)
    # rolling: an ELBO-bounded word perplexity, finite and > 1
    wp = res["tiny_rolling"]["word_perplexity,none"]
    assert math.isfinite(wp) and wp > 1
    # generation ran and was scored
    assert 0.0 <= res["tiny_gen"]["exact_match,none"] <= 1.0
    assert out["samples"]["tiny_gen"][0]["resps"][0][0] is not None


def test_downstream_cli_with_local_data_dir(run_dir, tmp_path, monkeypatch):
    """python -m eval.downstream reads built-in lm-eval tasks (lambada_openai, piqa) from local files."""
    from eval import downstream
    data = tmp_path / "data"
    (data / "lambada").mkdir(parents=True)
    (data / "lambada" / "lambada_test.jsonl").write_text(  # the OpenAI file name used in shared/data
        "".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_LIKE[:2]))
    (data / "piqa").mkdir()
    (data / "piqa" / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [
        {"goal": "sit on the", "sol1": "mat", "sol2": "sea", "label": 0},
        {"goal": "say yes or", "sol1": "day", "sol2": "no", "label": 1}]))
    out = tmp_path / "out"
    monkeypatch.setenv("DISABLE_MULTIPROC", "")  # recorded, so teardown restores the caller's environment
    monkeypatch.delenv("DISABLE_MULTIPROC")
    rc = downstream.main(["--ckpt", str(run_dir), "--tasks", "lambada_openai,piqa", "--data-dir", str(data),
                          "--mc-samples", "2", "--output", str(out), "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["lambada_openai"]["acc,none"] in (0.0, 0.5, 1.0)
    assert res["results"]["piqa"]["acc,none"] in (0.0, 0.5, 1.0)
    assert res["n-samples"]["piqa"]["effective"] == 2
    assert res["meta"]["mc_samples"] == 2
    # the perplexity stderr is bootstrapped in this process, not in a fork()ed pool that can hang under torch
    assert os.environ.get("DISABLE_MULTIPROC") == "1"
    se = res["results"]["lambada_openai"]["perplexity_stderr,none"]
    assert isinstance(se, float) and math.isfinite(se) and se >= 0
    md = (out / "results.md").read_text()
    assert "| piqa | acc |" in md and "| lambada_openai | perplexity |" in md


def test_missing_local_file_is_a_clear_error(run_dir, tmp_path):
    from eval import downstream
    with pytest.raises(SystemExit, match="no local file for task hellaswag"):
        downstream.main(["--ckpt", str(run_dir), "--tasks", "hellaswag", "--data-dir", str(tmp_path),
                         "--output", str(tmp_path / "o"), "--device", "cpu"])


def test_unmask_model_ar_checkpoint(tmp_path):
    """AR checkpoints go through the same lm-eval model with exact likelihoods."""
    import eval.lm_eval_model as m
    run = make_text_run(tmp_path / "ar", causal=True, seq_len=64)
    lm = m.UnmaskLM(ckpt=str(run), device="cpu")

    class Req:
        def __init__(self, args, doc_id):
            self.args, self.task_name, self.doc_id = args, "t", doc_id
    got = lm.loglikelihood([Req(("the cat sat on the", " mat"), 0)], disable_tqdm=True)
    c, x = encode_pair(lm.tok, "the cat sat on the", " mat", lm.prefix_id)
    logits = lm.model(torch.tensor([c + x]))[0].detach().double()
    logits[:, lm.mask_id] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[len(c) + i - 1, t]) for i, t in enumerate(x))
    assert got[0][0] == pytest.approx(want, abs=1e-5)
    (text,) = lm.generate_until([Req(("the cat", {"until": ["\n"], "max_gen_toks": 5}), 0)], disable_tqdm=True)
    assert isinstance(text, str)


def test_unknown_model_arg_is_an_error(run_dir):
    import eval.lm_eval_model as m
    with pytest.raises(ValueError, match="mc_sample"):
        m.UnmaskLM(ckpt=str(run_dir), device="cpu", mc_sample=3)
