"""QAT quality on a real pretrained model: float / PTQ / QAT perplexity and recovered %.

SmolLM2-135M-Instruct (the quickstart's model) on State of the Union text (train 1940-1999,
validate on 2010-2026), the same data, steps and seed for every run:

* ``float FT``: fine-tune the float model — fine-tuning alone moves perplexity, so QAT is also
  judged against it (``recovered vs FT``), not only against the starting float model;
* one QAT run per scheme, whose start-of-run baselines give the float and PTQ perplexities.

    recovered        = (ppl_ptq − ppl_qat) / (ppl_ptq − ppl_float_start)
    recovered vs FT  = (ppl_ptq − ppl_qat) / (ppl_ptq − ppl_float_finetuned)

Runs through the real CLI; ~15 min per run on a 2-core CPU at the defaults.

    python benchmarks/qat_quality.py --steps 60 --out benchmarks/results/qat_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from recipe_runs import ROOT, run_recipe

SCHEMES = {  # the restricted grids the README's table was measured on (before range: auto)
    "w4a8 (int4 g32 sym + int8 token)": '{match: "*", weight: {preset: w4a8, range: restricted}, activation: w4a8}',
    "int4 per-channel": '{match: "*", weight: {dtype: int4, granularity: channel, range: restricted}}',
    "int3 g64": '{match: "*", weight: {dtype: int3, granularity: group, group_size: 64, range: restricted}}',
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "qat_quality"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat_quality.json"))
    parser.add_argument(
        "--schemes", nargs="*", default=list(SCHEMES), help="subset of: " + " | ".join(SCHEMES)
    )
    args = parser.parse_args()
    common = [
        f"train.max_steps={args.steps}",
        "train.warmup_steps=5",
        f"train.lr={args.lr}",
        "eval.every_steps=0",
    ]
    runs_dir = Path(args.runs_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    results: dict = {"steps": args.steps, "lr": args.lr, "tokens_per_step": 4 * 256, "schemes": {}}
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / "runs.log", "w") as log:
        floating = run_recipe(
            "quickstart.yaml",
            runs_dir / "float_ft",
            [*common, "eval.at_start=true", "checkpoint.resume=never"],
            log,
        )
        results["float_start_ppl"] = floating["first"]["val_ppl"]
        results["float_ft_ppl"] = floating["final"]["val_ppl"]
        results["float_ft_minutes"] = floating["minutes"]
        for scheme in args.schemes:
            rules = f"quant={{rules: [{SCHEMES[scheme]}]}}"
            slug = scheme.split(" (")[0].replace(" ", "_")
            qat = run_recipe(
                "quickstart.yaml",
                runs_dir / f"qat_{slug}",
                [*common, "eval.at_start=false", "checkpoint.resume=never", rules],
                log,
            )
            base = qat["baselines"]
            ppl_qat = qat["final"]["val_ppl"]
            lost, lost_ft = (
                base["val_ppl_ptq"] - base["val_ppl_float"],
                base["val_ppl_ptq"] - results["float_ft_ppl"],
            )
            results["schemes"][scheme] = {
                "float": base["val_ppl_float"], "ptq": base["val_ppl_ptq"], "qat": ppl_qat,
                "recovered": (base["val_ppl_ptq"] - ppl_qat) / lost if lost > 0 else None,
                "recovered_vs_ft": (base["val_ppl_ptq"] - ppl_qat) / lost_ft if lost_ft > 0 else None,
                "minutes": qat["minutes"],
            }  # fmt: skip
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        f"\nSmolLM2-135M, State of the Union, {args.steps} steps x {results['tokens_per_step']} tokens, lr {args.lr}"
    )
    print(
        f"float start ppl {results['float_start_ppl']:.2f}; float fine-tuned ppl {results['float_ft_ppl']:.2f}"
    )
    print(f"{'scheme':<34} | {'float':>6} | {'PTQ':>7} | {'QAT':>6} | {'recovered':>9} | {'vs float FT':>11}")
    for scheme, r in results["schemes"].items():

        def pct(x):
            return f"{100 * x:.1f}%" if x is not None else "n/a"

        print(
            f"{scheme:<34} | {r['float']:>6.2f} | {r['ptq']:>7.2f} | {r['qat']:>6.2f} | {pct(r['recovered']):>9} | {pct(r['recovered_vs_ft']):>11}"
        )


if __name__ == "__main__":
    main()
