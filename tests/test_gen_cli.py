"""python -m eval.generate on small run directories."""
import re

import pytest

from eval.generate import main
from helpers_downstream import make_text_run, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_text_run(tmp_path_factory.mktemp("gen") / "run", seq_len=64)


def test_generate_cli_visualize(run_dir, capsys):
    rc = main(["--ckpt", str(run_dir), "--prompt", "the cat", "--prompt", "to be or not", "--gen-length", "8",
               "--steps", "8", "--block-length", "4", "--visualize", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    steps = re.findall(r"^\[step +(\d+)\]\[(\d)\] (.*)$", out, flags=re.M)
    assert len(steps) == 8 * 2  # every step, every prompt
    first = [s for s in steps if s[0] == "1"]
    assert all("░" in s[2] for s in first)  # partially masked early on
    last = [s for s in steps if s[0] == "8"]
    assert all("░" not in s[2] for s in last)  # nothing masked at the end
    assert "tokens/s" in out and "the cat" in out


def test_generate_cli_sampler_options(run_dir, capsys):
    rc = main(["--ckpt", str(run_dir), "--prompt", "she sells", "--gen-length", "8", "--steps", "4",
               "--temperature", "0.8", "--sampler", "mdlm", "--num-samples", "2", "--seed", "3", "--device", "cpu"])
    assert rc == 0
    rc = main(["--ckpt", str(run_dir), "--gen-length", "8", "--steps", "8", "--cfg-scale", "1.0",
               "--remasking", "random", "--min-new-tokens", "4", "--stop-at-eos", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.count("=" * 80) >= 3 + 2


def test_generate_cli_threads(run_dir, capsys, monkeypatch):
    import torch
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["--ckpt", str(run_dir), "--gen-length", "4", "--steps", "4", "--threads", "1",
                 "--device", "cpu"]) == 0
    assert calls == [1]


def test_generate_cli_ar_checkpoint(tmp_path, capsys):
    run = make_text_run(tmp_path / "ar", causal=True, seq_len=64)
    assert main(["--ckpt", str(run), "--prompt", "the cat", "--gen-length", "6", "--visualize",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "AR left-to-right" in out
    assert len(re.findall(r"^\[step", out, flags=re.M)) == 6


def test_generate_cli_too_long(run_dir, capsys):
    assert main(["--ckpt", str(run_dir), "--prompt", "the cat", "--gen-length", "1000", "--device", "cpu"]) == 2


def test_generate_cli_fast_decoding(run_dir, capsys):
    for extra in (["--decode", "threshold", "--threshold", "0.9"], ["--decode", "factor", "--factor", "1.0"],
                  ["--decode", "threshold", "--threshold", "0.9", "--kv-cache", "dual"],
                  ["--kv-cache", "prefix", "--refresh-every", "2"]):
        rc = main(["--ckpt", str(run_dir), "--prompt", "the cat", "--prompt", "to be or not", "--gen-length", "8",
                   "--block-length", "4", "--device", "cpu"] + extra)
        assert rc == 0
        out = capsys.readouterr().out
        assert out.count("=" * 80) == 3 and "full-canvas equivalents" in out
        if "threshold" in extra:
            assert "threshold decoding (tau 0.9)" in out
        if "dual" in extra:
            assert "dual KV cache" in out
    # an impossible combination is a clear error, not a traceback
    assert main(["--ckpt", str(run_dir), "--gen-length", "8", "--decode", "threshold", "--sampler", "mdlm",
                 "--device", "cpu"]) == 2
    assert "remasking=low_confidence" in capsys.readouterr().err


def test_lm_eval_generate_until_with_threshold_decoding(run_dir):
    """lm-eval's generate_until path with the fast-generation model args; a request's text does not depend
    on the other requests of its batch (per-request seeds)."""
    pytest.importorskip("lm_eval")
    import eval.lm_eval_model as m

    class Req:
        def __init__(self, args, doc_id):
            self.args, self.task_name, self.doc_id = args, "t", doc_id
    kw = dict(ckpt=str(run_dir), device="cpu", decode="threshold", threshold=0.9, kv_cache="dual",
              block_length=4, temperature=1.0)
    lm = m.UnmaskLM(**kw)
    opts = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True}
    reqs = [Req((c, opts), i) for i, c in enumerate(["the cat", "to be or not to be", "she"])]
    texts = lm.generate_until(reqs, disable_tqdm=True)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    (alone,) = lm.generate_until([reqs[1]], disable_tqdm=True)
    assert alone == texts[1]
    with pytest.raises(ValueError, match="decode"):
        m.UnmaskLM(ckpt=str(run_dir), device="cpu", decode="fastest")


def test_generate_cli_rows_do_not_depend_on_the_batch(run_dir, capsys):
    args = ["--ckpt", str(run_dir), "--gen-length", "8", "--block-length", "4", "--temperature", "1.0",
            "--decode", "threshold", "--kv-cache", "dual", "--seed", "5", "--device", "cpu"]

    def bodies(prompts):
        assert main(args + [x for p in prompts for x in ("--prompt", p)]) == 0
        out = capsys.readouterr().out.split("=" * 80 + "\n")
        return [b.strip() for b in out[1:-1]]
    both = bodies(["the cat", "to be or not to be"])
    assert bodies(["the cat"]) == both[:1]
