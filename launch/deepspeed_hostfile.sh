#!/usr/bin/env bash
# DeepSpeed's own launcher (pdsh/ssh over a hostfile). It only starts the processes: the engine and
# its ZeRO stage come from the run config (strategy.name: deepspeed, strategy.deepspeed.stage).
#   HOSTFILE=launch/hostfile.example bash launch/deepspeed_hostfile.sh CONFIG strategy.name=deepspeed [k=v ...]
# One node without a hostfile:  NPROC=8 bash launch/deepspeed_hostfile.sh CONFIG strategy.name=deepspeed
# `deepspeed --module` inserts --local_rank=N before lowbit's arguments; lowbit accepts and ignores
# it (the rank comes from the environment). run.output_dir must be on a filesystem every node shares.
set -euo pipefail
args=()
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR (the first host)}")
else
  args+=(--num_gpus "${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}")
fi
exec deepspeed "${args[@]}" --master_port "${MASTER_PORT:-29500}" --module lowbit.trainer train "$@"
