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
exec torchrun --standalone --nproc-per-node="$NPROC" -m pretrain "$@"
