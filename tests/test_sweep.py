"""launch.sweep: FLOPs budget -> steps by hand, planning errors, the slurm array, kill-and-resume; the data options
the sweeps use (Gutenberg stripping, the unique-token cap)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch import sweep
from tests.datakit import prepare_words

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------- FLOPs by hand

def test_step_flops_and_steps_match_hand_counts_causal_and_bidirectional():
    from pretrain.config import load_config
    from pretrain.loop.flops import step_flops, steps_for_budget
    over = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=32", "model.vocab_size=33",
            "model.mask_id=32", "model.max_seq_len=32", "data.seq_len=32", "data.synthetic.num_symbols=32",
            "train.global_batch_size=4"]
    # Non-embedding weights: wq wk wv wo 4*16*16 + SwiGLU 3*16*32 + norms 3*16 = 2608.
    n = 4 * 16 * 16 + 3 * 16 * 32 + 3 * 16
    # Random-length batches (r = 0.01): E[l] = 32 * 0.99 + 0.01 * 33 / 2, E[l^2] = 1024 * 0.99 + 0.01 * 33 * 65 / 6.
    e1 = 32 * 0.99 + 0.01 * 33 / 2
    e2 = 1024 * 0.99 + 0.01 * 33 * 65 / 6
    weights, attention_per_len, head = 6 * n, 12 * 1 * 16, 6 * 16 * 33
    causal = load_config(None, over + ["diffusion.objective=ar", "model.causal=true"])
    bidir = load_config(None, over)
    ar_step = 4 * (e1 * (weights + head) + e2 * attention_per_len)  # AR: logits at every position
    mdm_step = 4 * (e1 * (weights + head * ((1 - 1e-3) / 2 + 1e-3)) + e2 * attention_per_len)  # MDM: masked only
    assert step_flops(causal, n)["total"] == pytest.approx(ar_step, rel=1e-9)
    assert step_flops(bidir, n)["total"] == pytest.approx(mdm_step, rel=1e-5)
    assert step_flops(bidir, n)["tokens"] == pytest.approx(4 * e1)
    assert steps_for_budget(causal, 1e8, n) == int(1e8 // ar_step) == 31
    assert steps_for_budget(bidir, 1e8, n) == int(1e8 // mdm_step)
    assert steps_for_budget(causal, ar_step * 0.99, n) == 0
    from model.params import flops_by_term
    t = flops_by_term(causal.model, 32, n)
    assert (t["weights"], t["attention"], t["head"]) == (weights, 12 * 16 * 32, head)


# ----------------------------------------------------------------------------- planning

@pytest.fixture(scope="module")
def words(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("words")
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 60, size=int(rng.integers(20, 60))).tolist() for _ in range(120)]
    return prepare_words(tmp, docs, n_words=60)


def _spec(words, tmp, **kw):
    spec = {"name": "grid", "out_dir": str(tmp / "runs"),
            "base": {"model": {"max_seq_len": 16, "vocab_size": 64},
                     "data": {"kind": "prepared", "seq_len": 16, "sources": [{"path": str(words)}],
                              "valid_fraction": 0.1, "random_length_prob": 0.0},
                     "train": {"device": "cpu", "eval_batches": 1, "peak_flops": 1e11}},
            "sizes": [{"name": "a", "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32},
                      {"name": "b", "dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64}],
            "budgets": [2e8, 6e8], "objectives": ["mdm", "ar"], "unique_tokens": [160],
            "rules": {"batch_size": 4, "lr": {"base": 1e-3, "base_dim": 16, "exponent": 1.0}, "evals": 2},
            "eval": {"sequences": 4, "samples": 2}}
    spec.update(kw)
    return spec


def test_plan_steps_epochs_and_lr_rule_equal_hand_computation(words, tmp_path):
    plans = sweep.make_plan(_spec(words, tmp_path))
    assert len(plans) == 2 * 2 * 2
    V, L, G = 64, 16, 4
    for p in plans:
        d, layers, ffn = (16, 1, 32) if p.size == "a" else (32, 2, 64)
        n = layers * (4 * d * d + 3 * d * ffn + 2 * d) + d
        assert p.params_nonembed == n and p.params_total == n + 2 * V * d
        h = 1.0 if p.objective == "ar" else (1 - 1e-3) / 2 + 1e-3
        per_step = G * (L * (6 * n + 6 * d * V * h) + L * L * 12 * layers * d)  # no random-length batches here
        assert p.steps == int(p.budget // per_step)
        assert p.tokens == p.steps * G * L
        assert p.unique == 160 and p.epochs == pytest.approx(p.steps * G * L / 160)
        assert p.lr == pytest.approx(1e-3 * 16 / d)
        assert p.config["train"]["eval_every"] == -(-p.steps // 2)
        assert p.config["diffusion"]["objective"] == p.objective and p.config["model"]["causal"] == (p.objective == "ar")
    out = sweep.plan_table(plans)
    assert "a-mdm-C2e8-U1.6e2-s0" in out and "8 runs" in out


def test_exclude_drops_exactly_the_matching_runs(words, tmp_path):
    full = {p.name for p in sweep.make_plan(_spec(words, tmp_path))}
    plans = sweep.make_plan(_spec(words, tmp_path, exclude=[{"size": "a", "objective": "ar", "budget": 6e8},
                                                            {"size": "b", "budget": "2e8"}]))
    gone = {"a-ar-C6e8-U1.6e2-s0", "b-mdm-C2e8-U1.6e2-s0", "b-ar-C2e8-U1.6e2-s0"}
    assert gone <= full and {p.name for p in plans} == full - gone
    assert [p.index for p in plans] == list(range(len(plans)))


def test_labelled_entries_of_one_objective_are_separate_runs_and_two_masks_cost_two_passes(words, tmp_path):
    """Two genmd4 entries that differ only in keys the run name does not show need a `label`; with two masks
    per t (two network passes per sequence) a step costs twice the FLOPs, so a budget buys half the steps."""
    objectives = [{"name": "genmd4", "label": "g-s2", "overrides": {"diffusion.genmd4.samples_per_t": 2}},
                  {"name": "genmd4", "label": "g-s1", "overrides": {"diffusion.genmd4.samples_per_t": 1}}]
    plans = sweep.make_plan(_spec(words, tmp_path, objectives=objectives, budgets=[6e8], sizes=[
        {"name": "a", "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32}]))
    by = {p.label: p for p in plans}
    assert sorted(by) == ["g-s1", "g-s2"] and by["g-s2"].name == "a-g-s2-C6e8-U1.6e2-s0"
    assert by["g-s2"].step_flops["total"] == pytest.approx(2 * by["g-s1"].step_flops["total"])
    assert by["g-s2"].step_flops["tokens"] == by["g-s1"].step_flops["tokens"]
    assert by["g-s2"].steps in (by["g-s1"].steps // 2, by["g-s1"].steps // 2 + 1)
    with pytest.raises(sweep.SweepError, match="two runs share a name"):
        sweep.make_plan(_spec(words, tmp_path, objectives=[{k: v for k, v in o.items() if k != "label"}
                                                           for o in objectives]))
    with pytest.raises(sweep.SweepError, match="goes into run names"):
        sweep.make_plan(_spec(words, tmp_path, objectives=[dict(objectives[0], label="a b")]))


@pytest.mark.parametrize("change, needle", [
    (lambda s: s["sizes"].append({"name": "big", "preset": "85Mx"}), "sizes[2] 'big': unknown model preset"),
    (lambda s: s.update(budgets=[2e8, 1e3]), "budgets[1]"),
    (lambda s: s["sizes"][0].update(causal=True), "objectives[0] 'mdm' with sizes[0] 'a'"),
    (lambda s: s.update(objectives=["mdm", "block"]), "objectives[1] 'block'"),
    (lambda s: s.update(unique_tokens=[10**9]), "unique_tokens asks for"),
    (lambda s: s.update(exclude=[{"size": "c", "objective": "ar"}]), "'size': 'c'} matches no run of the grid"),
    (lambda s: s.update(exclude=[{"sizes": "a"}]), "exclude[0] {'sizes': 'a'}: an entry is a mapping of some of"),
])
def test_bad_sweep_stops_at_plan_naming_the_entry(words, tmp_path, capsys, change, needle):
    spec = _spec(words, tmp_path)
    change(spec)
    path = _write(tmp_path / "bad.yaml", spec)
    with pytest.raises(SystemExit) as e:
        sweep.main(["plan", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    if needle == "budgets[1]":
        assert "below one training step" in err
    assert not (tmp_path / "runs").exists()  # nothing started


# ----------------------------------------------------------------------------- slurm

def test_slurm_array_task_is_what_launch_slurm_writes_for_each_run(words, tmp_path):
    from launch.slurm import render
    spec = _spec(words, tmp_path, objectives=["mdm"], unique_tokens=[0])  # 2 sizes x 2 budgets
    plans = sweep.make_plan(spec)
    assert len(plans) == 4
    kw = dict(nodes=2, gpus_per_node=4, partition="gpu", account=None, qos=None, cpus_per_task=32,
              signal_lead=120, port=29500, log_dir="logs", python="python", setup=None)
    script = sweep.slurm_array(spec, plans, time_limit="02:00:00", max_parallel=2, **kw)
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --output=logs/%x-%A_%a.out" in script
    bodies = sweep.array_task_bodies(script)
    assert len(bodies) == 4
    d = sweep.sweep_dir(spec)
    for p, body in zip(plans, bodies):
        one = render(config=str(d / "configs" / f"{p.name}.yaml"), name=p.name, out_dir=str(d), overrides=[],
                     time="02:00:00", **kw)
        assert body == sweep.split_slurm_script(one)[1]
        assert f"train.name={p.name}" in "\n".join(body) and "scontrol requeue" in "\n".join(body)


def test_slurm_backend_writes_both_jobs_and_their_log_folder(words, tmp_path, monkeypatch):
    """run --backend slurm: the array and the collect job, the log folder created (slurm kills a job whose
    --output folder is missing), and no GPU request on a CPU cluster."""
    path = _write(tmp_path / "s.yaml", _spec(words, tmp_path, objectives=["mdm"], unique_tokens=[0]))
    monkeypatch.chdir(tmp_path)
    for gpus, want in (("0", False), ("2", True)):
        log_dir = tmp_path / f"logs-{gpus}" / "sweep"
        sweep.main(["run", str(path), "--backend", "slurm", "--gpus-per-node", gpus, "--log-dir", str(log_dir)])
        assert log_dir.is_dir()
        d = sweep.sweep_dir(sweep.load_sweep(path))
        collect = (d / "collect.sbatch").read_text()
        assert ("#SBATCH --gpus-per-node=1" in collect) == want, collect
        assert f"#SBATCH --output={log_dir}/%x-%j.out" in collect and f"launch.sweep collect {d}" in collect
        assert "#SBATCH --array=0-3" in (d / "sweep.sbatch").read_text()


# ----------------------------------------------------------------------------- kill and resume

def _events(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]


def test_killed_sweep_resumes_to_the_same_index_without_repeating_a_run(tmp_path):
    spec = {"name": "resume", "base": {"model": {"max_seq_len": 16}, "data": {"kind": "synthetic", "seq_len": 16,
                                                                           "synthetic": {"num_symbols": 16}},
                                       "train": {"device": "cpu", "eval_batches": 1, "peak_flops": 1e11}},
            "sizes": [{"name": "a", "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32}],
            "budgets": [5e7, 1.2e9, 3e8], "objectives": ["mdm"],
            "rules": {"batch_size": 4, "lr": 3e-3, "evals": 4}, "eval": {"sequences": 4, "samples": 2}}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start(out):
        path = _write(tmp_path / f"{out}.yaml", {**spec, "out_dir": str(tmp_path / out)})
        return subprocess.Popen([sys.executable, "-m", "launch.sweep", "run", str(path), "--backend", "local"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    assert start("whole").wait(timeout=600) == 0
    whole = tmp_path / "whole" / "resume"
    # Interrupted: kill -9 once the second (longest) run has a checkpoint but no result.
    proc = start("cut")
    cut = tmp_path / "cut" / "resume"
    second = cut / "a-mdm-C1.2e9-s0"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (second / "checkpoints").is_dir() and any(p.name.startswith("step_") and not p.name.endswith(".tmp")
                                                     for p in (second / "checkpoints").iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (second / sweep.RESULT).exists()
    assert len((cut / "index.jsonl").read_text().splitlines()) == 1
    assert start("cut").wait(timeout=600) == 0
    assert (cut / "index.jsonl").read_text() == (whole / "index.jsonl").read_text()
    ev = _events(cut)
    names = [r["name"] for r in map(json.loads, (whole / "index.jsonl").read_text().splitlines())]
    assert len(names) == 3
    for name in names:
        assert sum(e["event"] == "done" and e["run"] == name for e in ev) == 1  # no run finished twice
    first_run = names[0]
    assert [e["event"] for e in ev if e["run"] == first_run] == ["start", "done", "skip"]
    resumed = [e for e in ev if e["run"] == second.name and e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["from_step"] > 0


# ----------------------------------------------------------------------------- data options of the sweeps

def test_strip_gutenberg_keeps_only_the_book(tmp_path, capsys):
    from data.inputs import InputSpec, iter_documents, strip_gutenberg
    book = ("The Project Gutenberg EBook of X\r\nlicence words\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
            "Chapter 1\r\n\r\nIt was a dark night.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n")
    assert strip_gutenberg(book) == "Chapter 1\r\n\r\nIt was a dark night.\r\n"
    assert strip_gutenberg("no markers here\n") is None
    (tmp_path / "a.txt").write_text(book)
    (tmp_path / "b.txt").write_text("an old file without the markers\n")
    spec = InputSpec(inputs=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], doc_split="paragraph",
                     strip_gutenberg=True)
    assert list(iter_documents(spec)) == ["Chapter 1\r\n", "It was a dark night.\r\n"]
    assert "skipping" in capsys.readouterr().err
    spec.strip_gutenberg = False
    raw = list(iter_documents(spec))  # off: the header and licence come through with the book
    assert len(raw) == 3 and "licence words" in raw[0] and "more licence" in raw[1]


def test_strip_gutenberg_on_a_real_book(shared_data):
    from data.inputs import InputSpec, iter_documents
    path = sorted((shared_data / "gutenberg").glob("000-*.txt"))[0]
    (doc,) = iter_documents(InputSpec(inputs=[str(path)], doc_split="file", strip_gutenberg=True))
    raw = path.read_text(encoding="utf-8")
    assert "*** START OF" not in doc and "*** END OF" not in doc and "Project Gutenberg License" not in doc
    assert 0.8 * len(raw) < len(doc) < len(raw)


def test_unique_token_cap_repeats_the_first_samples_of_the_shuffled_order(words):
    from data import Loader, build_data, permute
    from tests.datakit import data_config
    cfg = data_config(words, seq_len=16, valid_fraction=0.1)
    full = build_data(cfg, 3).train
    cfg.unique_tokens = 10 * 16 + 5  # rounds down to 10 samples
    capped = build_data(cfg, 3).train
    assert capped.num_samples == 10
    first = permute(np.arange(10), full.num_samples, 3, 0)
    assert np.array_equal(capped.get(list(range(10)))[0].numpy(), full.get(first.tolist())[0].numpy())
    loader = Loader(capped, seed=3)
    for epoch in range(3):  # every epoch delivers exactly those 10 samples, reshuffled
        rows = [tuple(r) for r in loader.source.get(loader.source_indices(np.arange(10 * epoch, 10 * epoch + 10))
                                                     .tolist())[0].numpy()]
        assert sorted(rows) == sorted(tuple(r) for r in full.get(first.tolist())[0].numpy())
    cfg.unique_tokens = 10**9
    with pytest.raises(ValueError, match="unique_tokens"):
        build_data(cfg, 3)
