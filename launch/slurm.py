"""Write a slurm batch script: srun starts one torchrun per node, torchrun one process per GPU (or per CPU slot).

    python -m launch.slurm --nodes 8 --gpus-per-node 8 --config configs/X.yaml --name myrun \
        --partition gpu --time 24:00:00 [key.sub=value ...] > job.sbatch
    sbatch job.sbatch                     # from the same folder: the log folder was created there

GPUs are asked for with --gpus-per-node=N (--gres-style gpus-per-node, the default) or --gres=gpu:N
(--gres-style gres, for clusters configured that way). --gpus-per-node 0 (or --cpu) writes a CPU job: no GPU
request, gloo, train.device=cpu, --nproc-per-node processes per node (default 1).

The job's output file (--output=<log-dir>/%x-%j.out) is opened by slurm before the script runs, so its folder
must exist when the job starts: this command creates <log-dir> (default logs/, relative to the current folder,
which is where sbatch must then be run: slurm resolves a relative --output against the submission folder).

The rendezvous address is asked of the first node itself (srun on it: its own IPv4 address, not a loopback
one), so node names need not resolve on the other nodes.

Preemption and time limits: slurm sends SIGUSR1 to every process of the job `--signal-lead` seconds before
the time limit. torchrun ignores it (the srun command traps it away); the training processes catch it, agree
across ranks, finish the step, checkpoint, write <run>/PREEMPTED and exit; the script then requeues the job
(`scontrol requeue`), which restarts later and resumes from the latest checkpoint (train.resume=auto).
`scancel --signal=USR1 --full` does the same by hand (the batch shell traps the signal and keeps waiting).
A requeued job is held for the cluster's credential lifetime + 1 s before it may start again (AuthInfo
cred_expire, 120 s by default). On preemption by another job slurm sends SIGTERM instead and SIGKILL
`KillWait` seconds later (a cluster setting, 30 s by default: `scontrol show config | grep KillWait`, given
here as --kill-wait). The run saves only if its measured save time fits in that grace period
(train.preempt_grace_s), else exits at once so the previous checkpoint stays the latest; torchrun waits as
long (--shutdown-timeout) instead of killing its workers after its own 30 s. It writes PREEMPTED either way,
and slurm requeues the job itself when the partition's PreemptMode is REQUEUE. A worker that crashes is
restarted by torchrun (--max-restarts) from the latest checkpoint. --save-seconds (printed by a run at each
checkpoint, and kept in its trainer_state.json as save_seconds) and --step-seconds derive the SIGUSR1 lead:
2 x (step + save) + 30 s.
"""
from __future__ import annotations

import argparse
import math
import shlex
from typing import Optional

GRES_STYLES = ("gpus-per-node", "gres")

_NETWORK = """\
# ---- Network: cluster-specific, set these yourself (see docs/distributed.md) ----
{ifname}
# export NCCL_IB_HCA=mlx5              # InfiniBand adapters to use (RoCE/IB clusters)
# export NCCL_IB_GID_INDEX=3           # RoCE only
# export NCCL_NET_GDR_LEVEL=PHB        # GPUDirect RDMA policy
# export FI_PROVIDER=efa               # AWS EFA (with the aws-ofi-nccl plugin)
# export NCCL_DEBUG=WARN               # INFO to debug hangs and topology
export TORCH_NCCL_ASYNC_ERROR_HANDLING=3   # a failed collective ends the process (after a flight-recorder dump)
"""

_IFNAME_UNSET = """\
# export NCCL_SOCKET_IFNAME=ib0        # interface for NCCL's bootstrap / socket transport (--socket-ifname)
# export GLOO_SOCKET_IFNAME=ib0        # the same for gloo (host-side groups: preemption flags, async saves)"""

_IFNAME_SET = """\
export NCCL_SOCKET_IFNAME={0}        # interface for NCCL's bootstrap / socket transport
export GLOO_SOCKET_IFNAME={0}        # the same for gloo (host-side groups: preemption flags, async saves)"""

_NETWORK_CPU = """\
# ---- Network: cluster-specific (see docs/distributed.md) ----
{ifname}"""

_GLOO_IFNAME_UNSET = "# export GLOO_SOCKET_IFNAME=eth0       # interface gloo's sockets use (--socket-ifname)"
_GLOO_IFNAME_SET = "export GLOO_SOCKET_IFNAME={0}        # interface gloo's sockets use"

_FLIGHT_RECORDER = """\
# NCCL flight recorder (parallel.flight_recorder): on a collective timeout every rank dumps its last
# collectives here; python -m torch.distributed.flight_recorder.fr_trace "$RUN_DIR/nccl_trace" shows who hung.
export TORCH_FR_DUMP_TEMP_FILE="$RUN_DIR/nccl_trace/rank_"
mkdir -p "$RUN_DIR/nccl_trace"
"""


def gpu_request(gpus_per_node: int, gres_style: str = "gpus-per-node") -> list[str]:
    """The sbatch option that asks for the GPUs (none for a CPU job)."""
    if gres_style not in GRES_STYLES:
        raise ValueError(f"gres_style must be one of {', '.join(GRES_STYLES)}, got {gres_style!r}")
    if gpus_per_node <= 0:
        return []
    return [f"--gpus-per-node={gpus_per_node}" if gres_style == "gpus-per-node" else f"--gres=gpu:{gpus_per_node}"]


# A node's address as the other nodes reach it, run on that node: the IPv4 address of --socket-ifname if given,
# else the first non-loopback IPv4 address among `hostname --ip-address` (what the node's name resolves to
# there) and `hostname -I` (its interfaces; a name mapped to 127.0.1.1 in /etc/hosts would send the other nodes
# to themselves), else whatever `hostname --ip-address` says.
_NODE_ADDR = ('for a in $(hostname --ip-address) $(hostname -I); do case $a in 127.*|*:*) ;; *) echo $a; exit;; '
              'esac; done; set -- $(hostname --ip-address); echo $1')


def node_address_command(socket_ifname: Optional[str] = None) -> str:
    """Shell code that prints the address of the node it runs on (see _NODE_ADDR)."""
    if not socket_ifname:
        return _NODE_ADDR
    return (f"set -- $(ip -o -4 addr show dev {shlex.quote(socket_ifname)} 2>/dev/null); "
            'if [ -n "${4:-}" ]; then echo "${4%/*}"; exit; fi; ' + _NODE_ADDR)


def render(*, nodes: int, gpus_per_node: int, config: str, name: str, out_dir: str, overrides: list[str],
           time: str, partition: Optional[str], account: Optional[str], qos: Optional[str], cpus_per_task: int,
           signal_lead: int, port: int, log_dir: str, python: str, setup: Optional[str],
           socket_ifname: Optional[str] = None, flight_recorder: int = 0, prepare: bool = True,
           kill_wait: int = 30, max_restarts: int = 3, gres_style: str = "gpus-per-node",
           nproc_per_node: Optional[int] = None) -> str:
    """The sbatch script. gpus_per_node=0: a CPU job (gloo, train.device=cpu, nproc_per_node processes per
    node, default 1); else nproc_per_node defaults to gpus_per_node."""
    cpu = gpus_per_node <= 0
    nproc = nproc_per_node or (1 if cpu else gpus_per_node)
    if cpu and flight_recorder:
        raise ValueError("the flight recorder records NCCL collectives: a CPU job (gloo) has none")
    sbatch = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the per-GPU processes
        *gpu_request(gpus_per_node, gres_style),
        f"--cpus-per-task={cpus_per_task}",
        f"--time={time}",
        "--requeue",
        "--open-mode=append",  # a requeued job appends to its log instead of truncating it
        f"--signal=USR1@{signal_lead}",
        f"--output={log_dir}/%x-%j.out",
    ]
    for key, value in (("partition", partition), ("account", account), ("qos", qos)):
        if value:
            sbatch.append(f"--{key}={value}")
    if flight_recorder:
        overrides = [*overrides, f"parallel.flight_recorder={flight_recorder}"]
    if cpu:
        overrides = ["train.device=cpu", *overrides]
    train_args = " ".join(shlex.quote(a) for a in ["--config", config, f"train.out_dir={out_dir}",
                                                    f"train.name={name}", "train.resume=auto",
                                                    f"train.preempt_grace_s={kill_wait}", *overrides])
    prepare_args = " ".join(shlex.quote(a) for a in ["--config", config, *overrides])
    threads = max(1, cpus_per_task // nproc)
    if cpu:
        network = _NETWORK_CPU.format(ifname=_GLOO_IFNAME_SET.format(shlex.quote(socket_ifname))
                                      if socket_ifname else _GLOO_IFNAME_UNSET) + "\n"
        kind = f"CPU job: gloo, {nproc} process(es) per node"
    else:
        network = _NETWORK.format(ifname=_IFNAME_SET.format(shlex.quote(socket_ifname)) if socket_ifname
                                  else _IFNAME_UNSET)
        kind = f"GPU job: NCCL, {nproc} process(es) per node"
    lines = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sbatch] + [
        f"# Generated by python -m launch.slurm ({kind}).",
        f"# --output: slurm opens {log_dir}/ before this script runs; python -m launch.slurm created it in the",
        "# folder it ran in. Run sbatch from that folder (a relative --output is relative to it).",
        "set -uo pipefail",
        "",
        network,
        f"export OMP_NUM_THREADS={threads}",
        *([setup] if setup else []),
        "",
        f"RUN_DIR={shlex.quote(out_dir)}/{shlex.quote(name)}",
        f"LOG_DIR={shlex.quote(log_dir)}",
        'mkdir -p "$LOG_DIR" "$RUN_DIR"',
        'rm -f "$RUN_DIR/PREEMPTED"  # only this attempt\'s signal may requeue it',
        "# scancel --signal=USR1 --full (or --signal=B:USR1@...) signals this shell too: note it, keep waiting.",
        "trap 'echo \"batch script: SIGUSR1, the training processes save and stop\"' USR1",
        "# Addresses: every node gives its own (asked on the node: node names need not resolve on the other",
        "# nodes); the rendezvous store runs on the first node, at the address that node gives.",
        "export UNMASK_NODE_ADDR=" + shlex.quote(node_address_command(socket_ifname)),
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'MASTER_ADDR=$(srun --nodes=1 --ntasks=1 --nodelist="$head" bash -c "$UNMASK_NODE_ADDR")',
        'if [ -z "$MASTER_ADDR" ]; then echo "no address for the head node $head"; exit 1; fi',
        f"MASTER_PORT=$(( {port} + SLURM_JOB_ID % 1000 ))  # distinct per job on shared nodes",
        *([_FLIGHT_RECORDER] if flight_recorder else []),
        *(["# Data preparation once, on one node, before any process group exists (nothing waits in a collective).",
           f"srun --nodes=1 --ntasks=1 {python} -m launch.prepare_data {prepare_args} || exit 1"] if prepare else []),
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES nodes, '
        'rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# Per node: torchrun ignores SIGUSR1 (trap '' is inherited through exec); the training processes install",
        "# their own handler. Per-rank logs: $LOG_DIR/$SLURM_JOB_ID/node<N>/... (torchrun --log-dir); LOGLEVEL=INFO",
        "# logs each node's rendezvous (group_rank, global_ranks, restart_count) and lines carry their global rank.",
        "# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each worker group (first start and every --max-restarts restart)",
        "# gets a fresh store; the shared one keeps the dead workers' keys, which restarted workers then read.",
        f"# SIGTERM (preemption): slurm sends SIGKILL {kill_wait} s later (KillWait); the run saves only if that",
        "# leaves time (train.preempt_grace_s), torchrun waits as long for its workers (--shutdown-timeout), and",
        f"# a crashed worker group restarts up to {max_restarts} times from the latest checkpoint (--max-restarts).",
        'srun --kill-on-bad-exit=1 --output="$LOG_DIR/%x-%j-node%n.out" \\',
        "    --export=ALL,MASTER_ADDR=$MASTER_ADDR,MASTER_PORT=$MASTER_PORT \\",
        "    bash -c \"trap '' USR1",
        "        addr=\\$(bash -c \\\"\\$UNMASK_NODE_ADDR\\\"); is_host=0; [ \\$SLURMD_NODENAME = $head ] && is_host=1",
        "        echo node \\$SLURM_NODEID of $SLURM_JOB_NUM_NODES: \\$SLURMD_NODENAME at \\$addr, "
        "restart ${SLURM_RESTART_COUNT:-0}",
        "        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 LOGLEVEL=INFO",
        "        export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank\\${rank}]:'",
        "        exec " + python + " -m torch.distributed.run \\",
        f"        --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node={nproc} --local-addr=\\$addr \\",
        "        --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID \\",
        "        --rdzv-conf=is_host=\\$is_host \\",
        "        --log-dir=$LOG_DIR/$SLURM_JOB_ID/node\\$SLURM_NODEID --redirects=3 --tee=3 \\",
        f"        --max-restarts={max_restarts} --shutdown-timeout={kill_wait} \\",
        f"        -m pretrain {train_args}\"",
        "status=$?",
        "",
        "# Stopped on a signal (with a fresh checkpoint, or none if the grace period was too short): requeue; the",
        "# next attempt resumes from the latest checkpoint.",
        'if [ -f "$RUN_DIR/PREEMPTED" ]; then',
        '    echo "preempted: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        "exit $status",
    ]
    return "\n".join(lines) + "\n"


def signal_lead_for(save_seconds: float, step_seconds: float = 0.0) -> int:
    """SIGUSR1 lead before the time limit: the step in flight plus a save, doubled for slow filesystems, plus
    30 s for the agreement across ranks and the exit."""
    return int(math.ceil(2 * (step_seconds + save_seconds))) + 30


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0: a CPU job (gloo)")
    ap.add_argument("--cpu", action="store_true", help="a CPU job: the same as --gpus-per-node 0")
    ap.add_argument("--gres-style", choices=GRES_STYLES, default="gpus-per-node",
                    help="how the job asks for GPUs: --gpus-per-node=N, or --gres=gpu:N (clusters whose GPUs are "
                    "a generic resource only)")
    ap.add_argument("--nproc-per-node", type=int, default=None, help="training processes per node (default: "
                    "one per GPU; 1 on a CPU job)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--name", default=None, help="job and run name (default: the config file's stem)")
    ap.add_argument("--out-dir", default="runs")
    ap.add_argument("--time", default="24:00:00")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--qos")
    ap.add_argument("--cpus-per-task", type=int, default=64, help="CPUs per node (the one task per node)")
    ap.add_argument("--signal-lead", type=int, default=300, help="seconds before the time limit to send SIGUSR1: "
                    "enough for one step plus a checkpoint (derived from --save-seconds when that is given)")
    ap.add_argument("--save-seconds", type=float, default=0.0, help="measured checkpoint time (a run prints it "
                    "at each save; save_seconds in trainer_state.json): sets the lead to 2 x (step + save) + 30 s")
    ap.add_argument("--step-seconds", type=float, default=0.0, help="measured time of one training step")
    ap.add_argument("--kill-wait", type=int, default=30, help="the cluster's KillWait: seconds from SIGTERM to "
                    "SIGKILL (scontrol show config | grep KillWait); the grace period for a save on preemption")
    ap.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts of a failed worker group")
    ap.add_argument("--port", type=int, default=29500)
    ap.add_argument("--log-dir", default="logs", help="the job's logs; created now (slurm opens the job's output "
                    "file there before the script runs): run sbatch from the folder this command ran in")
    ap.add_argument("--python", default="python", help="interpreter on the compute nodes (e.g. a venv's)")
    ap.add_argument("--setup", default=None, help="a shell line run before training (module load, venv activate)")
    ap.add_argument("--socket-ifname", default=None, help="network interface for NCCL and gloo sockets "
                    "(NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME), e.g. ib0, and the one whose address the head node "
                    "gives for the rendezvous; default: left commented out")
    ap.add_argument("--flight-recorder", type=int, default=0, help="NCCL flight recorder: keep this many "
                    "collective records per rank, dumped to <run>/nccl_trace on a timeout (0: off)")
    ap.add_argument("--no-prepare", action="store_true", help="skip the data preparation step before torchrun")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tp=2")
    args = ap.parse_args(argv)
    if args.cpu:
        args.gpus_per_node = 0
    if args.nodes < 1 or args.gpus_per_node < 0:
        ap.error("--nodes must be >= 1 and --gpus-per-node >= 0 (0: a CPU job)")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        ap.error("--nproc-per-node must be >= 1")
    if args.gpus_per_node == 0 and args.flight_recorder:
        ap.error("--flight-recorder records NCCL collectives: a CPU job (gloo) has none")
    from pathlib import Path
    from pretrain.config import ConfigError, load_config
    cpu_overrides = ["train.device=cpu"] if args.gpus_per_node == 0 else []
    try:  # fail now, not after hours in the queue
        load_config(args.config, [*cpu_overrides, *args.overrides])
    except ConfigError as e:
        ap.exit(2, f"config error: {e}\n")
    name = args.name or Path(args.config).stem
    if args.save_seconds > 0:
        args.signal_lead = signal_lead_for(args.save_seconds, args.step_seconds)
    script = render(nodes=args.nodes, gpus_per_node=args.gpus_per_node, config=args.config, name=name,
                    out_dir=args.out_dir, overrides=args.overrides, time=args.time, partition=args.partition,
                    account=args.account, qos=args.qos, cpus_per_task=args.cpus_per_task,
                    signal_lead=args.signal_lead, port=args.port, log_dir=args.log_dir, python=args.python,
                    setup=args.setup, socket_ifname=args.socket_ifname, flight_recorder=args.flight_recorder,
                    prepare=not args.no_prepare, kill_wait=args.kill_wait, max_restarts=args.max_restarts,
                    gres_style=args.gres_style, nproc_per_node=args.nproc_per_node)
    make_log_dir(args.log_dir)
    print(script, end="")


def make_log_dir(log_dir: str) -> None:
    """Create the job's log folder now: slurm opens --output before the script runs, and a missing folder
    kills the job at launch (JobLaunchFailure, exit 0:53) with no log anywhere."""
    import sys
    from pathlib import Path
    path = Path(log_dir)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        print(f"launch.slurm: created {path}/ for the job's logs; run sbatch from {Path.cwd()}"
              if not path.is_absolute() else f"launch.slurm: created {path}/ for the job's logs", file=sys.stderr)


if __name__ == "__main__":
    main()
