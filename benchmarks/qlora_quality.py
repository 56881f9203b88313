"""QLoRA quality on a real model: SmolLM2-135M-Instruct on State of the Union text (1940-1999
train, 2010-2026 validation), the same data, steps, batches and seed per row.

Rows: QLoRA (NF4 base + r=16 adapters on every linear,
configs/qlora_smollm2.yaml), QLoRA + KD from the float model (configs/qlora_kd_smollm2.yaml), and
full fine-tuning (configs/quickstart.yaml, every weight trained in float), and merge-aware LoRA on
the Q4_0 grid (configs/lora_q4_0_merge_aware.yaml). "before" is each run's starting model (for
QLoRA: the NF4 base). Then the merged exports: the QLoRA adapter model vs its merge in float
(``--format merged``, read back by plain transformers) vs that merge rounded to Q4_0
(``--format gguf-q4_0 --ptq``'s merge check), and the merge-aware run's exact Q4_0 export.

    python benchmarks/qlora_quality.py --steps 15
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from recipe_runs import ROOT, quality_setup, run_recipe

RUNS = {
    "QLoRA (NF4 + r16 LoRA)": ("qlora_smollm2.yaml", []),
    "QLoRA + KD (float teacher)": ("qlora_kd_smollm2.yaml", []),
    "full fine-tuning (float)": ("quickstart.yaml", ["export=null"]),
    "LoRA, merge-aware on the Q4_0 grid": ("lora_q4_0_merge_aware.yaml", []),
}


def lowbit(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lowbit.trainer", *args], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"lowbit {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    args, runs_dir, results = quality_setup(__doc__, "qlora_quality")
    common = [f"train.max_steps={args.steps}", "eval.every_steps=0", "eval.at_start=true", "export=null"]
    with open(runs_dir / "runs.log", "w") as log:
        for name, (recipe, extra) in RUNS.items():
            if name in results["rows"]:  # --reuse: trained already
                continue
            slug = recipe.removesuffix(".yaml")
            r = run_recipe(recipe, runs_dir / slug, [*common, *extra], log)
            results["rows"][name] = {
                "before": r["first"]["val_ppl"],
                "after": r["final"]["val_ppl"],
                "minutes": r["minutes"],
            }
            Path(args.out).write_text(json.dumps(results, indent=2))
    qlora = runs_dir / "qlora_smollm2"
    merged = runs_dir / "merged"
    lowbit("export", str(qlora), "--format", "merged", "--out", str(merged), "--overwrite")
    table = lowbit("eval", str(merged), *_val_overrides())
    results["merged_float_eval"] = table
    gguf = runs_dir / "merged-q4_0.gguf"
    results["merge_check_q4_0"] = lowbit(
        "export", str(qlora), "--format", "gguf-q4_0", "--ptq", "--out", str(gguf), "--overwrite"
    )
    aware = runs_dir / "lora_q4_0_merge_aware"
    results["merge_aware_q4_0"] = lowbit(
        "export",
        str(aware),
        "--format",
        "gguf-q4_0",
        "--out",
        str(runs_dir / "merge-aware-q4_0.gguf"),
        "--overwrite",
    )
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"| run ({args.steps} steps) | ppl before | ppl after | minutes |\n|---|---|---|---|")
    for name, row in results["rows"].items():
        print(f"| {name} | {row['before']:.2f} | {row['after']:.2f} | {row['minutes']:.1f} |")
    print("\nmerged float (transformers):\n" + table)
    print("QLoRA merged into Q4_0 (PTQ):\n" + results["merge_check_q4_0"])
    print("merge-aware LoRA into Q4_0 (exact):\n" + results["merge_aware_q4_0"])


def _val_overrides() -> list[str]:
    """The quickstart's validation text and cap, for evaluating a plain model directory."""
    from lowbit.trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    files = ", ".join(f"'{name}'" for name in cfg.data.val_files)  # quoted: a glob's * is YAML syntax
    return [f"data.val_files=[{files}]", f"data.max_val_examples={cfg.data.max_val_examples}",
            f"data.seq_len={cfg.data.seq_len}"]  # fmt: skip


if __name__ == "__main__":
    main()
