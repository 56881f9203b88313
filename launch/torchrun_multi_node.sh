#!/usr/bin/env bash
# Several machines: run this same command on every node (e.g. via pdsh or your scheduler).
#   NNODES=4 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 bash launch/torchrun_multi_node.sh CONFIG [k=v ...]
# The c10d rendezvous assigns node ranks, so nodes may start in any order; run.output_dir must
# be on a filesystem all nodes share (checkpoints are written by global rank 0, RNG by every rank).
set -euo pipefail
# Each restart gets a fresh rendezvous store (a restarted rank never reads a dead peer's address).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR (the rendezvous host)}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-lowbit-$MASTER_ADDR-$MASTER_PORT}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  -m lowbit.trainer train "$@"
