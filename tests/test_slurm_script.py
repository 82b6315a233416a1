"""The text of the job python -m launch.slurm writes: the CPU form, both ways of asking for GPUs, the log folder
made before sbatch reads the script, the rendezvous address asked on the head node, and the preemption parts
that must keep their meaning. (tests/test_slurm_cluster.py runs the script on a real cluster.)"""
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")


class Out:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


@pytest.fixture
def generate(capsys, monkeypatch):
    """python -m launch.slurm --config configs/tiny.yaml ARGS, in this process (the config check imports torch:
    seconds per interpreter on a busy machine)."""
    from launch.slurm import main

    def run(*args: str, cwd=ROOT, check: bool = True) -> Out:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = 0
        try:
            main(["--config", CONFIG, *args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        if check:
            assert code == 0, err
        return Out(code, out, err)
    return run


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_cpu_form_asks_for_no_gpu_and_trains_on_cpu_with_gloo(generate, tmp_path):
    by_flag = generate("--nodes", "2", "--cpu", "--cpus-per-task", "4", "--log-dir", str(tmp_path / "l")).stdout
    by_zero = generate("--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "4",
                       "--log-dir", str(tmp_path / "l")).stdout
    assert by_flag == by_zero
    opts = sbatch_lines(by_flag)
    assert not [o for o in opts if o.startswith(("--gpus", "--gres"))], opts
    assert "--nodes=2" in opts and "--ntasks-per-node=1" in opts and "--cpus-per-task=4" in opts
    assert "CPU job: gloo, 1 process(es) per node" in by_flag
    assert "--nproc-per-node=1" in by_flag and "train.device=cpu" in by_flag
    assert "export OMP_NUM_THREADS=4" in by_flag
    assert "NCCL" not in by_flag  # no NCCL exports or comments in a gloo job
    assert "# export GLOO_SOCKET_IFNAME=" in by_flag
    # several processes per node share the task's CPUs
    two = generate("--nodes", "1", "--cpu", "--nproc-per-node", "2", "--cpus-per-task", "4", "--socket-ifname",
                   "eth0", "--log-dir", str(tmp_path / "l")).stdout
    assert "--nproc-per-node=2" in two and "export OMP_NUM_THREADS=2" in two
    assert "export GLOO_SOCKET_IFNAME=eth0" in two
    # the flight recorder records NCCL collectives only
    bad = generate("--nodes", "1", "--cpu", "--flight-recorder", "100", "--log-dir", str(tmp_path / "l"),
                   check=False)
    assert bad.returncode == 2 and "NCCL" in bad.stderr


@pytest.mark.parametrize("style, request_line", [("gpus-per-node", "--gpus-per-node=4"), ("gres", "--gres=gpu:4")])
def test_gpu_request_styles(generate, tmp_path, style, request_line):
    out = generate("--nodes", "2", "--gpus-per-node", "4", "--gres-style", style, "--cpus-per-task", "32",
                   "--log-dir", str(tmp_path / "l")).stdout
    gpu_opts = [o for o in sbatch_lines(out) if o.startswith(("--gpus", "--gres"))]
    assert gpu_opts == [request_line]
    assert "--nproc-per-node=4" in out and "export OMP_NUM_THREADS=8" in out
    assert "train.device=cpu" not in out and "GPU job: NCCL, 4 process(es) per node" in out
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in out


def test_default_gpu_request_is_unchanged(generate, tmp_path):
    out = generate("--nodes", "8", "--log-dir", str(tmp_path / "l")).stdout
    assert [o for o in sbatch_lines(out) if o.startswith(("--gpus", "--gres"))] == ["--gpus-per-node=8"]
    assert "--nproc-per-node=8" in out


def test_log_folder_exists_before_sbatch_reads_the_script(generate, tmp_path):
    p = generate("--nodes", "1", "--cpu", cwd=tmp_path)
    assert (tmp_path / "logs").is_dir()  # slurm opens --output=logs/%x-%j.out before the script runs
    assert "--output=logs/%x-%j.out" in sbatch_lines(p.stdout)
    assert "created logs" in p.stderr and str(tmp_path) in p.stderr
    nested = generate("--nodes", "1", "--cpu", "--log-dir", "a/b", cwd=tmp_path)
    assert (tmp_path / "a" / "b").is_dir() and "--output=a/b/%x-%j.out" in sbatch_lines(nested.stdout)
    again = generate("--nodes", "1", "--cpu", cwd=tmp_path)  # an existing folder: nothing to say
    assert again.stdout == p.stdout and "created" not in again.stderr


def test_rendezvous_address_is_asked_on_the_head_node(generate, tmp_path):
    out = generate("--nodes", "2", "--cpu", "--log-dir", str(tmp_path / "l")).stdout
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in out
    assert 'MASTER_ADDR=$(srun --nodes=1 --ntasks=1 --nodelist="$head" bash -c "$UNMASK_NODE_ADDR")' in out
    assert "--local-addr=\\$addr" in out  # every node publishes its own address, not its name
    assert "--rdzv-conf=is_host=\\$is_host" in out and "[ \\$SLURMD_NODENAME = $head ] && is_host=1" in out
    assert "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" in out
    # the address snippet itself, run here: an IP address, not a loopback one when the machine has another
    line = next(s for s in out.splitlines() if s.startswith("export UNMASK_NODE_ADDR="))
    code = subprocess.run(["bash", "-c", line + '; bash -c "$UNMASK_NODE_ADDR"'], capture_output=True, text=True,
                          timeout=30).stdout.strip()
    addr = ipaddress.ip_address(code)
    others = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    if any(not a.startswith("127.") and ":" not in a for a in others):
        assert not addr.is_loopback and addr.version == 4


@pytest.mark.skipif(shutil.which("ip") is None, reason="no `ip` command here")
def test_socket_ifname_gives_that_interfaces_address(generate, tmp_path):
    out = generate("--nodes", "2", "--cpu", "--socket-ifname", "lo", "--log-dir", str(tmp_path / "l")).stdout
    line = next(s for s in out.splitlines() if s.startswith("export UNMASK_NODE_ADDR="))
    code = subprocess.run(["bash", "-c", line + '; bash -c "$UNMASK_NODE_ADDR"'], capture_output=True, text=True,
                          timeout=30).stdout.strip()
    assert code == "127.0.0.1"


def test_preemption_parts_keep_their_meaning(generate, tmp_path):
    out = generate("--nodes", "2", "--cpu", "--kill-wait", "45", "--max-restarts", "5", "--save-seconds", "10",
                   "--step-seconds", "2", "--log-dir", str(tmp_path / "l")).stdout
    opts = sbatch_lines(out)
    assert "--requeue" in opts and "--open-mode=append" in opts and "--signal=USR1@54" in opts
    assert "train.resume=auto" in out and "train.preempt_grace_s=45" in out
    assert "--max-restarts=5 --shutdown-timeout=45" in out
    assert "trap '' USR1" in out  # torchrun ignores SIGUSR1, the workers catch it
    assert "trap 'echo" in out and "USR1\n" in out  # the batch shell survives scancel --signal=USR1 --full
    assert out.index("launch.prepare_data") < out.index("torch.distributed.run")
    assert 'if [ -f "$RUN_DIR/PREEMPTED" ]' in out and 'scontrol requeue "$SLURM_JOB_ID"' in out
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
