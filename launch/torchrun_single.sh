#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU-only machine, N gloo processes).
#
#   launch/torchrun_single.sh 8 --config configs/X.yaml [key.sub=value ...]
#
# --standalone runs a private rendezvous on a free local port, so several jobs can share a machine.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun_single.sh NPROC --config CONFIG [overrides...]}
shift
# One CPU thread per process unless the user chose otherwise: N processes x all cores oversubscribes the host.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# CUDA caching allocator: expandable segments (tensor sizes change every micro-batch: masked rows, CE chunks,
# random-length steps; fixed-size segments fragment). Kept if the user set either spelling of the variable.
if [ -z "${PYTORCH_ALLOC_CONF:-}" ] && [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}" ]; then
    export PYTORCH_ALLOC_CONF=expandable_segments:True
fi
# NCCL errors: 3 (ProcessGroupNCCL's own default: report and exit, the flight recorder may dump first). torchrun
# would hand its workers 1 (abort at once, no dump) when the variable is unset. Kept if the user set it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
exec torchrun --standalone --nproc-per-node="$NPROC" -m pretrain "$@"
