#!/usr/bin/env bash
# One machine, NPROC processes (one per GPU; on a CPU box, gloo processes).
#   NPROC=8 bash launch/torchrun_single_node.sh configs/quickstart.yaml train.max_steps=1000
# Same as `lowbit train --nproc-per-node 8 ...`; use this form when you want torchrun's own flags.
set -euo pipefail
# Each restart gets a fresh rendezvous store (a restarted rank never reads a dead peer's address).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m lowbit.trainer train "$@"
