"""benchmarks/gpu_check.py on CPU (--dry-run): the row logic, a failed pre-flight, an overrun and the deadline
alarm; every case must write its files and exit cleanly. And launch.plan imports without PyYAML."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(tmp_path, *args, timeout=400):
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("preflight.json", "correctness.json", "speed.json", "memory.json", "tables.md",
                 "speed.jsonl", "correctness.jsonl", "memory.jsonl", "kernels.jsonl"):
        assert (tmp_path / name).exists(), name
    rows = {}
    for name in ("correctness", "speed", "memory", "kernels"):
        for line in (tmp_path / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows[(r["table"], r.get("id"))] = r
    return p.stdout, rows, (tmp_path / "tables.md").read_text()


def status(r: dict) -> str:
    return r.get("skipped") or r.get("error") or "ok"


def test_dry_run_runs_every_kind_of_row_and_streams_each_one(tmp_path):
    # One row of each kind: precision (autocast, FSDP), compiled op-AC speed, FSDP speed, eager speed, the
    # ragged/GQA attention case, an attention-kernel pair.
    wanted = "1a,2.1,2.5,2.8,1b.ragged,2b.documents"
    out, rows, tables = gpu_check(tmp_path, "--rows", wanted, "--budget-s", "900", "--deadline-s", "1200")
    ids = {(t, i) for t, i in rows}
    expected = {("precision", "1a.bf16"), ("precision", "1a.fsdp"), ("speed", "2.1"), ("speed", "2.5"),
                ("speed", "2.8"), ("memory", "2.1"), ("memory", "2.5"), ("memory", "2.8"),
                ("attention", "1b.ragged.sdpa"), ("attention", "1b.ragged.flex"),
                ("kernels", "2b.documents.flex"), ("kernels", "2b.documents.sdpa")}
    assert ids == expected, ids
    for key, r in rows.items():
        assert status(r) == "ok", (key, r)
    assert rows[("speed", "2.5")]["fsdp"] and rows[("speed", "2.1")]["compile"]
    assert not rows[("speed", "2.8")]["compile"]
    assert rows[("speed", "2.1")]["tokens_per_s"] > 0 and rows[("memory", "2.1")]["predicted_gib"] > 0
    # Printed as each row finished, in plan order (speed 2.1 before the attention rows before speed 2.5).
    printed = [out.index(f"| {x}") for x in ("2.1 1028M", "ragged L=50", "2.5 1028M FSDP")]
    assert printed == sorted(printed)
    assert "Table 1a" in tables and "Table 2:" in tables and "Table 2b" in tables and "Table 3" in tables
    assert "STOPPED" not in tables
    assert json.loads((tmp_path / "preflight.json").read_text())["checks"]["compile"] == ""


def test_failed_preflight_turns_dependent_rows_into_skips(tmp_path):
    out, rows, tables = gpu_check(tmp_path, "--force-preflight-fail", "compile,flex,yaml",
                                  "--rows", "1a.bf16,2.1,2.9,1b.packed,2b.documents")
    assert status(rows[("precision", "1a.bf16")]) == "ok"
    assert "compile: forced failure" in rows[("speed", "2.1")]["skipped"]
    assert status(rows[("speed", "2.9")]) == "ok"  # eager blocks, SDPA: needs neither
    assert "yaml: forced failure" in rows[("memory", "2.9")]["skipped"]
    assert status(rows[("attention", "1b.packed.sdpa")]) == "ok"
    assert "flex: forced failure" in rows[("attention", "1b.packed.flex")]["skipped"]
    assert all("flex: forced failure" in rows[("kernels", f"2b.documents.{b}")]["skipped"] for b in ("flex", "sdpa"))
    assert "compile FAILED: forced failure" in tables


def test_overrun_skips_rows_before_they_start_and_the_alarm_writes_everything(tmp_path):
    # 2.1's warm-up is made to count as 10x the budget: 2.2 (compiled) is skipped before it starts; the next
    # row that starts hangs, the alarm interrupts it, every later row is marked, the files are written, exit 0.
    out, rows, tables = gpu_check(tmp_path, "--force-overrun", "--rows", "1a.bf16,2.1,2.2,1b.packed,2.8")
    assert status(rows[("precision", "1a.bf16")]) == "ok" and status(rows[("speed", "2.1")]) == "ok"
    assert "would overrun the budget" in rows[("speed", "2.2")]["skipped"]
    assert "would overrun the budget" in rows[("memory", "2.2")]["skipped"]
    assert rows[("attention", "1b.packed.sdpa")]["skipped"].startswith("interrupted: deadline alarm")
    for key in (("attention", "1b.packed.flex"), ("speed", "2.8"), ("memory", "2.8")):
        assert rows[key]["skipped"].startswith("skipped: deadline alarm"), rows[key]
    assert "STOPPED: deadline alarm" in tables
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert [r["id"] for r in speed["rows"]] == ["2.1", "2.2", "2.8"]


def test_launch_plan_imports_and_estimates_without_yaml():
    code = ("import sys; sys.modules['yaml'] = None\n"
            "import launch.plan as p\n"
            "from model import get_preset\n"
            "a = p.activation_bytes(get_preset('1028M'), seq_len=2048, micro=8, tp=1, ac='op', ac_every=2)\n"
            "assert a['total'] > 0 and 'yaml' not in {k for k, v in sys.modules.items() if v is not None}\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
