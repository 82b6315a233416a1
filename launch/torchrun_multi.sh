#!/usr/bin/env bash
# Several nodes with a c10d rendezvous: run the same command on every node.
#
#   NNODES=4 NPROC_PER_NODE=8 MASTER_ADDR=node001 MASTER_PORT=29500 RDZV_ID=myrun \
#       launch/torchrun_multi.sh --config configs/X.yaml [key.sub=value ...]
#
# MASTER_ADDR is any one of the nodes (it hosts the rendezvous store); RDZV_ID must be the same on all nodes
# and unique per job. Node ranks are assigned by the rendezvous, so the command is identical everywhere.
# Per-rank logs go to $LOG_DIR/<rdzv id>/attempt_<n>/<local rank>/{stdout,stderr}.log (and to the console).
# Network settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are the cluster's: see docs/distributed.md.
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-unmask}
LOG_DIR=${LOG_DIR:-logs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# CUDA caching allocator: expandable segments (tensor sizes change every micro-batch: masked rows, CE chunks,
# random-length steps; fixed-size segments fragment). Kept if the user set either spelling of the variable.
if [ -z "${PYTORCH_ALLOC_CONF:-}" ] && [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}" ]; then
    export PYTORCH_ALLOC_CONF=expandable_segments:True
fi
# NCCL errors: 3 (ProcessGroupNCCL's own default: report and exit, the flight recorder may dump first). torchrun
# would hand its workers 1 (abort at once, no dump) when the variable is unset. Kept if the user set it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
    --log-dir="$LOG_DIR" --redirects=3 --tee=3 \
    -m pretrain "$@"
