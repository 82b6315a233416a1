"""The job python -m launch.slurm writes, on a real two-node Slurm cluster started on this machine
(launch/local_slurm.sh: munged, slurmctld, slurmd -N n1, slurmd -N n2): CPU/gloo training across the two nodes
equal bit for bit to a single-machine torchrun run, SIGUSR1 -> save -> requeue -> resume, SIGTERM (a requeue from
outside, as preemption with PreemptMode=REQUEUE) inside KillWait, a worker crash restarted by torchrun, and a
sweep submitted as a real array. Skipped only where slurmctld is not installed (.ci/run installs it); a cluster
that does not start fails the tests with its daemons' logs."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "launch" / "local_slurm.sh"
CONFIG = str(ROOT / "configs" / "tiny.yaml")

SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"  # Debian: daemons
pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("slurmctld", path=SBIN_PATH) is None,
                                 reason="slurmctld is not installed (apt-get install -y slurm-wlm munge; .ci/run "
                                        "installs them when missing)")]

STEPS = 60
# configs/tiny.yaml for 60 steps (room for a signal's latency on a fast machine), a checkpoint every 10, every
# step logged; no sampling, plot or FLOP/s probe.
TRAIN = [f"train.steps={STEPS}", "train.save_every=10", "train.eval_every=1000", "train.log_every=1",
         "train.samples=0", "train.peak_flops=1e11", "logging.plot=false", "logging.progress_bar=false"]
KILL_WAIT = 15  # the cluster's KillWait and the jobs' --kill-wait
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def base_env() -> dict:
    # One thread per process (2 cores); the jobs inherit this environment (sbatch --export=ALL).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class Cluster:
    def __init__(self, d: Path):
        self.dir = d
        self.env = {**base_env(), "SLURM_CONF": str(d / "slurm.conf")}
        self.port = random.randint(20000, 28000)  # rendezvous ports: port + job id % 1000

    def daemon_logs(self) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            out.append(f"---- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    def run(self, *cmd: str, cwd=None, timeout: float = 60) -> str:
        p = subprocess.run(list(cmd), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}\n{self.daemon_logs()}"
        return p.stdout

    def job(self, jid: str) -> dict:
        p = subprocess.run(["scontrol", "show", "job", "-o", jid], env=self.env, capture_output=True, text=True,
                           timeout=30)
        line = p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else ""
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, jid: str, until, what: str, timeout: float, logs=lambda: "") -> dict:
        """Poll the job until until(info) holds; fail on a failed state or after timeout, with the logs."""
        deadline = time.time() + timeout
        while True:
            info = self.job(jid)
            if info and until(info):
                return info
            state = info.get("JobState", "?")
            if state in FAILED or time.time() > deadline:
                pytest.fail(f"job {jid}: {'state ' + state if state in FAILED else 'timed out'} waiting for {what} "
                            f"(Restarts={info.get('Restarts')}, Reason={info.get('Reason')})\n{logs()}\n"
                            f"{self.daemon_logs()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    env = {**base_env(), "LOCAL_SLURM_KILL_WAIT": str(KILL_WAIT)}
    try:
        p = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(d)], env=env, capture_output=True, text=True,
                           timeout=120)
        if p.returncode != 0:
            pytest.fail(f"the local slurm cluster did not start (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")
        yield Cluster(d)
    finally:  # every daemon it started, by pid, also after a failed start or test
        stop = subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(d)], env=env, capture_output=True,
                              text=True, timeout=120)
        print(stop.stdout, stop.stderr)


class Reference:
    """The same training on one machine: torchrun --standalone --nproc_per_node=2 (gloo), one thread each. It
    starts with the first test that asks for it and runs beside that test's job; curve() waits for it."""

    def __init__(self, out: Path):
        self.out, self.log = out, out / "torchrun.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node=2", "-m", "pretrain", "--config", CONFIG,
                                          "train.device=cpu", f"train.out_dir={out}", "train.name=ref", *TRAIN],
                                         cwd=ROOT, env=base_env(), stdout=log, stderr=subprocess.STDOUT)
        self._curve = None

    def curve(self) -> dict:
        if self._curve is None:
            assert self.proc.wait(timeout=600) == 0, self.log.read_text()[-4000:]
            self._curve = curve(self.out / "ref")
        return self._curve


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


# ----------------------------------------------------------------------------- run folders and logs

def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "loss" in r]


def curve(run_dir: Path) -> dict:
    """step -> (loss, grad norm), and the final validation loss; a resumed run's later records win."""
    train, val = {}, {}
    for r in records(run_dir):
        if "loss" in r:
            train[r["step"]] = (r["loss"], r["grad_norm"])
        val.update({(r["step"], k): v for k, v in r.items() if k.startswith("val/")})
    return {"train": train, "val": val}


def checkpoint_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(m.group(1)) for p in (d.iterdir() if d.is_dir() else [])
                  if (m := re.fullmatch(r"step_(\d+)", p.name)))


def in_folder(folder: Path, module: str, *argv: str) -> str:
    """python -m MODULE ARGV run in folder, in this process (one torch import for all jobs instead of one
    interpreter each: seconds apiece on 2 cores); returns its stdout."""
    import importlib
    main = importlib.import_module(module).main
    out, here = io.StringIO(), os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out):
            main(list(argv))
    finally:
        os.chdir(here)
    return out.getvalue()


def text(*paths: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in paths if p.is_file())


class Job:
    """A job written by python -m launch.slurm in a fresh folder (its logs/ made by launch.slurm) and submitted."""

    def __init__(self, cluster: Cluster, tmp: Path, name: str, *overrides: str, prepare: bool = True):
        self.cluster, self.tmp, self.name = cluster, tmp, name
        script = in_folder(tmp, "launch.slurm", "--nodes", "2", "--cpu", "--cpus-per-task", "1", "--config", CONFIG,
                           "--name", name, "--out-dir", str(tmp / "runs"), "--python", sys.executable, "--port",
                           str(cluster.port), "--kill-wait", str(KILL_WAIT), "--time", "00:15:00",
                           *([] if prepare else ["--no-prepare"]), *TRAIN, *overrides)
        assert (tmp / "logs").is_dir()  # made by launch.slurm, before sbatch
        (tmp / "job.sbatch").write_text(script)
        self.id = cluster.run("sbatch", "--parsable", "job.sbatch", cwd=tmp).strip().split(";")[0]
        self.run_dir = tmp / "runs" / name

    def batch_log(self) -> str:
        return text(self.tmp / "logs" / f"{self.name}-{self.id}.out")

    def node_logs(self) -> list[str]:
        return [text(self.tmp / "logs" / f"{self.name}-{self.id}-node{n}.out") for n in (0, 1)]

    def logs(self) -> str:
        return f"---- batch log\n{self.batch_log()[-3000:]}\n" + "".join(
            f"---- node {n}\n{log[-4000:]}\n" for n, log in enumerate(self.node_logs()))

    def wait(self, until, what: str, timeout: float = 240) -> dict:
        return self.cluster.wait(self.id, until, what, timeout, self.logs)

    def wait_steps(self, n: int, timeout: float = 240) -> None:
        """Until n steps are logged and the step-10 checkpoint is complete."""
        deadline, asked = time.time() + timeout, 0.0
        while len(logged_steps(self.run_dir)) < n or 10 not in checkpoint_steps(self.run_dir):
            if time.time() - asked > 1:  # the files every 50 ms, slurm once a second
                asked, info = time.time(), self.cluster.job(self.id)
                if info.get("JobState") in FAILED | {"COMPLETED"} or time.time() > deadline:
                    pytest.fail(f"job {self.id} ({info.get('JobState')}) did not reach step {n} in time\n"
                                f"{self.logs()}")
            time.sleep(0.05)

    def done(self, timeout: float = 300) -> dict:
        info = self.wait(lambda i: i.get("JobState") == "COMPLETED", "the end of training", timeout)
        assert info["ExitCode"] == "0:0", self.logs()
        return info


def assert_same_training(run_dir: Path, reference: Reference, logs: str) -> None:
    got = curve(run_dir)
    assert sorted(got["train"]) == list(range(1, STEPS + 1)), logs
    assert got == reference.curve(), "losses differ from the single-machine torchrun run"  # bit for bit
    assert checkpoint_steps(run_dir)[-1] == STEPS


# ----------------------------------------------------------------------------- the tests

def test_two_nodes_train_to_the_end_equal_to_torchrun(cluster, reference, tmp_path):
    job = Job(cluster, tmp_path, "two")
    info = job.done()
    assert info["NumNodes"] == "2" and info["Restarts"] == "0"
    assert logged_steps(job.run_dir) == list(range(1, STEPS + 1))
    assert_same_training(job.run_dir, reference, job.logs())
    # each node ran one torchrun with its own rank: one node holds global rank 0, the other rank 1
    ranks = []
    for n, log in enumerate(job.node_logs()):
        assert f"node {n} of 2: n{n + 1} at " in log, log[-2000:]
        found = re.findall(r"global_ranks=\[(\d+)\]", log)
        assert len(found) == 1, log[-2000:]
        ranks.append(int(found[0]))
    assert sorted(ranks) == [0, 1]
    assert "world 2 (dp 2, tp 1)" in job.node_logs()[ranks.index(0)]
    assert f"[rank0]:step     {STEPS}/{STEPS} | loss" in job.node_logs()[ranks.index(0)]
    assert f"job {job.id} (restart 0) on 2 nodes" in job.batch_log()
    assert "nothing to prepare (data.kind=synthetic)" in job.batch_log()  # the preparation step ran, once


def test_sigusr1_saves_requeues_and_resumes_to_the_same_curve(cluster, reference, tmp_path):
    job = Job(cluster, tmp_path, "usr1", prepare=False)  # (the two-node test runs the preparation step)
    job.wait_steps(12)
    cluster.run("scancel", "--signal=USR1", "--full", job.id)  # every process of every step, the batch shell too
    job.wait(lambda i: i.get("Restarts") == "1", "the requeue")
    marker = read_marker(job)
    info = job.done()
    assert info["Restarts"] == "1"
    batch = job.batch_log()
    assert "batch script: SIGUSR1" in batch  # the batch shell survived the signal
    assert f"preempted: requeueing job {job.id}" in batch
    assert f"job {job.id} (restart 1) on 2 nodes" in batch  # SLURM_RESTART_COUNT=1
    steps = logged_steps(job.run_dir)
    stopped = int(re.search(r"resumed at step (\d+)", "".join(job.node_logs())).group(1))
    assert 12 <= stopped < STEPS
    if marker is not None:  # read while the requeued job was held
        assert marker.startswith("SIGUSR1\ncheckpoint saved") and f"step_{stopped:08d}" in marker
    assert steps == list(range(1, STEPS + 1))  # saved at the step it stopped: no step ran twice
    assert_same_training(job.run_dir, reference, job.logs())


def test_sigterm_within_kill_wait_keeps_the_previous_checkpoint_and_resumes(cluster, reference, tmp_path):
    # train.preempt_grace_s below any save time stands for a save longer than KillWait: the no-save branch.
    job = Job(cluster, tmp_path, "term", "train.preempt_grace_s=0.001", prepare=False)
    job.wait_steps(12)
    t0 = time.time()
    cluster.run("scontrol", "requeue", job.id)  # what PreemptMode=REQUEUE does: SIGTERM, KillWait, SIGKILL, requeue
    deadline = t0 + KILL_WAIT + 60
    while job_processes(job):  # the requeued job is held for 11 s (cred_expire + 1): only attempt 1 is here
        assert time.time() < deadline, job.logs()
        time.sleep(0.1)
    ended = time.time() - t0
    assert ended < KILL_WAIT, f"the job needed {ended:.0f} s to stop: past KillWait ({KILL_WAIT} s), SIGKILLed"
    ran = max(logged_steps(job.run_dir))
    previous = (ran - 1) // 10 * 10  # the last regular checkpoint before the step it stopped at
    latest = checkpoint_steps(job.run_dir)
    marker = read_marker(job)
    assert job.cluster.job(job.id)["Restarts"] == "1"
    assert 12 <= ran < STEPS and latest[-1] == previous, (latest, ran)  # no save: the previous one stays latest
    if marker is not None:
        assert marker.startswith("SIGTERM\nno time to save") and f"resume from step_{previous:08d}" in marker
    job.done()
    logs = "".join(job.node_logs())
    assert f"no time to save, step_{previous:08d} stays latest, exiting for requeue" in logs, job.logs()
    assert f"resumed at step {previous}" in logs
    assert f"job {job.id} (restart 1) on 2 nodes" in job.batch_log()
    steps = logged_steps(job.run_dir)
    assert steps == list(range(1, ran + 1)) + list(range(previous + 1, STEPS + 1))  # those steps ran again
    assert_same_training(job.run_dir, reference, job.logs())


def read_marker(job: Job):
    """<run>/PREEMPTED as the first attempt left it (None once the requeued attempt has started and removed it)."""
    if job.cluster.job(job.id).get("JobState") == "RUNNING":
        return None
    try:
        return (job.run_dir / "PREEMPTED").read_text()
    except FileNotFoundError:
        return None


def job_processes(job: Job) -> list[tuple[int, str]]:
    """(pid, command line) of this job's processes (their environment names the job and this cluster)."""
    want = {f"SLURM_JOB_ID={job.id}".encode(), f"SLURM_CONF={job.cluster.env['SLURM_CONF']}".encode()}
    out = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = env_file.read_bytes().split(b"\0")
            cmd = (env_file.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if want <= set(env):
            out.append((int(env_file.parent.name), cmd))
    return out


def test_worker_crash_is_restarted_by_torchrun_from_the_latest_checkpoint(cluster, reference, tmp_path):
    job = Job(cluster, tmp_path, "crash", prepare=False)
    job.wait_steps(12)
    workers = [pid for pid, cmd in job_processes(job)
               if " -m pretrain " in cmd and "torch.distributed.run" not in cmd and not cmd.startswith("bash")]
    assert len(workers) == 2, job_processes(job)
    os.kill(random.choice(workers), signal.SIGKILL)
    info = job.done()
    assert info["Restarts"] == "0"  # torchrun restarted the workers; slurm did not requeue the job
    logs = "".join(job.node_logs())
    assert "restart_count=1" in logs, job.logs()
    resumed = int(re.search(r"resumed at step (\d+)", logs).group(1))  # the latest checkpoint at the crash
    assert resumed % 10 == 0 and 10 <= resumed < STEPS
    steps = logged_steps(job.run_dir)
    crashed = next((steps[i - 1] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), resumed)
    assert steps == list(range(1, crashed + 1)) + list(range(resumed + 1, STEPS + 1))
    assert_same_training(job.run_dir, reference, job.logs())


SWEEP = {"name": "grid", "base": {"model": {"max_seq_len": 16},
                                  "data": {"kind": "synthetic", "seq_len": 16, "synthetic": {"num_symbols": 16}},
                                  "train": {"device": "cpu", "eval_batches": 1, "peak_flops": 1e11}},
         "sizes": [{"name": "a", "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32},
                   {"name": "b", "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64}],
         "budgets": [6e7, 1.2e8], "objectives": ["mdm"],
         "rules": {"batch_size": 4, "lr": 3e-3, "evals": 2}, "eval": {"sequences": 4, "samples": 2}}


def test_sweep_array_on_slurm_indexes_like_the_local_backend(cluster, tmp_path):
    def sweep_file(backend):
        path = tmp_path / f"{backend}.yaml"
        path.write_text(yaml.safe_dump({**SWEEP, "out_dir": str(tmp_path / backend)}))
        return str(path)

    local = subprocess.Popen([sys.executable, "-m", "launch.sweep", "run", sweep_file("local"), "--backend", "local"],
                             cwd=tmp_path, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        (tmp_path / "logs").mkdir()  # launch.sweep writes the array's --output here; it must exist before sbatch
        in_folder(tmp_path, "launch.sweep", "run", sweep_file("slurm"), "--backend", "slurm", "--nodes", "1",
                  "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "00:15:00", "--python", sys.executable,
                  "--port", str(cluster.port), "--log-dir", str(tmp_path / "logs"))
        d = tmp_path / "slurm" / "grid"
        script = (d / "sweep.sbatch").read_text()
        assert "#SBATCH --array=0-3" in script and "--gpus" not in script and "--gres" not in script
        array = cluster.run("sbatch", "--parsable", str(d / "sweep.sbatch"), cwd=tmp_path).strip().split(";")[0]

        def logs() -> str:
            return "\n".join(f"---- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                             for p in sorted((tmp_path / "logs").glob("*.out")))

        deadline = time.time() + 300
        while cluster.run("squeue", "-h", "-j", array, "-o", "%i").strip():
            if time.time() > deadline:
                pytest.fail(f"array {array} did not finish\n{logs()}\n{cluster.daemon_logs()}")
            time.sleep(0.5)
        tasks = cluster.run("scontrol", "show", "job", "-o", array).strip().splitlines()
        states = [dict(re.findall(r"(\w+)=(\S*)", t)) for t in tasks]
        assert sorted(int(s["ArrayTaskId"]) for s in states) == [0, 1, 2, 3]
        assert all(s["JobState"] == "COMPLETED" and s["ExitCode"] == "0:0" for s in states), logs()
        cluster.run(sys.executable, "-m", "launch.sweep", "collect", str(d), cwd=tmp_path, timeout=300)
        out, _ = local.communicate(timeout=600)
        assert local.returncode == 0, out[-3000:]
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()
    slurm_index = (d / "index.jsonl").read_text()
    assert len(slurm_index.splitlines()) == 4
    assert slurm_index == (tmp_path / "local" / "grid" / "index.jsonl").read_text()
