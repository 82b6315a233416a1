"""LAMBADA last-word accuracy, greedy joint decoding and likelihood ranking (eval/lambada.py)."""
import json

import pytest

from eval.lambada import candidate_words, evaluate_lambada, main, split_passage
from eval.likelihood import conditional_loglikelihood, encode_pair, greedy_fill
from eval.load import load
from helpers_downstream import make_text_run, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

PASSAGES = ["the cat sat on the mat and the dog sat on the log",
            "she sells sea shells by the sea shore",
            "to be or not to be that is the question",
            "a quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load(make_text_run(tmp_path_factory.mktemp("lambada") / "run", seq_len=64))


def test_split_and_candidates():
    ctx, tgt = split_passage("the cat sat on the mat")
    assert (ctx, tgt) == ("the cat sat on the", " mat")  # lm-eval's lambada_openai split
    assert candidate_words("the cat, the dog's bowl; a cat", " bowl") == ["the", "cat", "dog's", "bowl", "a"]


def test_greedy_and_ranking_agree_with_their_definitions(run):
    tok, model, mask = run.tokenizer, run.model, run.cfg.model.mask_id
    res = evaluate_lambada(model, tok, PASSAGES, mask_id=mask, mc_samples=4, seed=2, prefix_id=tok.eos_id)
    assert res["n"] == 4 and res["lm_eval_acc_equivalent"] == "greedy_acc"
    pairs = [encode_pair(tok, *split_passage(p)) for p in PASSAGES]
    preds = greedy_fill(model, [c for c, _ in pairs], [len(x) for _, x in pairs], mask_id=mask)
    assert res["greedy_acc"] == sum(p == x for p, (_, x) in zip(preds, pairs)) / 4
    for d, p in zip(res["details"], preds):
        assert d["greedy"] == tok.decode(p)
    # ranking: the target wins iff its estimate beats every other passage word's (same seed => same noise)
    for i, passage in enumerate(PASSAGES):
        ctx, tgt = split_passage(passage)
        words = candidate_words(ctx, tgt)
        enc = [encode_pair(tok, ctx, " " + w) for w in words]
        lls = conditional_loglikelihood(model, [c for c, _ in enc], [x for _, x in enc], mask_id=mask,
                                        mc_samples=4, seed=2)
        scores = {w: r.logprob for w, r in zip(words, lls)}
        best = max(scores, key=scores.get)
        assert res["details"][i]["ranked_best"] == best
        assert res["details"][i]["ranking_ok"] == (best == tgt.strip())
    assert res["ranking_acc"] == sum(d["ranking_ok"] for d in res["details"]) / 4


def test_multi_token_targets_are_predicted_jointly(run):
    tok = run.tokenizer
    # a made-up word has no merge in the tiny BPE: several tokens, filled by iterative unmasking
    passage = "the cat sat on the zqxwv"
    res = evaluate_lambada(run.model, tok, [passage], mask_id=run.cfg.model.mask_id, mc_samples=4, ranking=False)
    d = res["details"][0]
    assert d["target_tokens"] > 1 and res["multi_token_targets"] == 1
    assert len(tok.encode(d["greedy"])) >= 1 and res["ranking_acc"] is None


def test_cli_writes_report(run, tmp_path, capsys):
    data = tmp_path / "lam.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    out = tmp_path / "report.json"
    assert main(["--ckpt", str(run.path.parent), "--data", str(data), "--mc-samples", "2", "--output", str(out),
                 "--device", "cpu"]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 4 and 0 <= rep["greedy_acc"] <= 1 and 0 <= rep["ranking_acc"] <= 1
    assert "lm-eval" in capsys.readouterr().out
