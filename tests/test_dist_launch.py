"""Launchers end to end on one machine: a 2-"node" c10d rendezvous with launch/torchrun_multi.sh, and the
generated slurm script run with stand-in srun/scontrol: SIGUSR1 -> checkpoint -> requeue -> resume."""
import json
import os
import random
import signal
import subprocess
import sys
import time

from dist_launch import ROOT, env
from launch.procs import descendants

TINY = ["logging.progress_bar=false", "train.samples=0", "train.device=cpu", "train.eval_every=1000",
        "train.log_every=1", "data.random_length_prob=0"]


def logged_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_two_node_c10d_rendezvous(tmp_path):
    port = str(random.randint(20000, 40000))
    e = {**env(), "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
         "RDZV_ID": f"test{port}", "LOG_DIR": str(tmp_path / "logs")}
    cmd = ["bash", str(ROOT / "launch" / "torchrun_multi.sh"), "--config", "configs/tiny.yaml",
           f"train.out_dir={tmp_path}", "train.steps=3", *TINY]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "world 2 (dp 2, tp 1)" in "".join(outs)  # one process per "node", joined into one job
    assert logged_steps(tmp_path / "tiny") == [1, 2, 3]
    assert len(list((tmp_path / "logs").rglob("stdout.log"))) == 2  # per-rank logs


SRUN = """#!/bin/bash
# Stand-in for srun on one node: drop srun's options, run the command in its own process group.
while [[ "$1" == --* ]]; do shift; done
echo $$ > "$SHIM_DIR/srun.pid"
export SLURM_NODEID=0 SLURMD_NODENAME=localhost
exec setsid "$@"
"""
SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo localhost; exit 0; fi
echo "$@" >> "$SHIM_DIR/scontrol.log"
"""


def test_slurm_script_requeues_on_sigusr1_and_resumes(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    gen = subprocess.run([sys.executable, "-m", "launch.slurm", "--nodes", "1", "--gpus-per-node", "2",
                          "--config", "configs/tiny.yaml", "--name", "job", "--out-dir", str(runs), "--log-dir",
                          str(logs), "--cpus-per-task", "2", "--python", sys.executable, "train.steps=80",
                          "train.save_every=1000", *TINY], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(gen.stdout)
    job_id = str(random.randint(1000, 900000))
    e = {**env(), "PATH": f"{shims}:{os.environ['PATH']}", "SHIM_DIR": str(shims), "SLURM_JOB_ID": job_id,
         "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    run_dir = runs / "job"

    # First attempt: signal torchrun (which must ignore it) and only ONE of the two ranks (the other must
    # stop at the same step through the per-step agreement), as slurm's --signal=USR1@lead would.
    job = subprocess.Popen(["bash", str(script)], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while len(logged_steps(run_dir)) < 3:
        assert job.poll() is None, job.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    torchrun_pid = int((shims / "srun.pid").read_text())
    workers = descendants(torchrun_pid)
    assert len(workers) >= 2
    os.kill(torchrun_pid, signal.SIGUSR1)
    os.kill(workers[-1], signal.SIGUSR1)
    out = job.communicate(timeout=180)[0]
    assert job.returncode == 0, out[-4000:]
    assert (shims / "scontrol.log").read_text().split() == ["requeue", job_id]
    assert (run_dir / "PREEMPTED").is_file()
    steps = logged_steps(run_dir)
    stopped = steps[-1]
    assert stopped < 80
    from pretrain.checkpoint.store import latest_checkpoint, read_trainer_state
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and read_trainer_state(ckpt)["step"] == stopped
    assert len(list((logs / job_id).rglob("stdout.log"))) == 2  # per-rank logs of the attempt

    # The requeued attempt: same script, resumes and finishes, no further requeue.
    again = subprocess.run(["bash", str(script)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:]
    assert f"resumed at step {stopped}" in again.stdout
    assert (shims / "scontrol.log").read_text().split() == ["requeue", job_id]
    assert not (run_dir / "PREEMPTED").exists()
    assert logged_steps(run_dir) == steps + list(range(stopped + 1, 81))
    assert read_trainer_state(latest_checkpoint(run_dir / "checkpoints"))["step"] == 80
