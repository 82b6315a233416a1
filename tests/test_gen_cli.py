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


def test_generate_cli_ar_checkpoint(tmp_path, capsys):
    run = make_text_run(tmp_path / "ar", causal=True, seq_len=64)
    assert main(["--ckpt", str(run), "--prompt", "the cat", "--gen-length", "6", "--visualize",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "AR left-to-right" in out
    assert len(re.findall(r"^\[step", out, flags=re.M)) == 6


def test_generate_cli_too_long(run_dir, capsys):
    assert main(["--ckpt", str(run_dir), "--prompt", "the cat", "--gen-length", "1000", "--device", "cpu"]) == 2
