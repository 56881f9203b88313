"""QAT side by side with torchao 0.18: same model, data, batches, steps, optimizer and evaluation.

Protocol (the one an independent evaluator used, see issue 14): SmolLM2-135M-Instruct, State of
the Union text (train 1940-1999, validate on 64 blocks of 2010-2026), 60 steps × 4 × 256 tokens,
AdamW lr 1e-5 constant, betas (0.9, 0.999), no weight decay, seed 0, perplexity with the fake
quant on. Every arm is a run of lowbit's trainer; the torchao arm swaps lowbit's quant transform
for torchao's own ``quantize_(model, QATConfig(..., step="prepare"))`` (``torchao_arm.py``), so the
arms differ only in the fake quant and the loss: the batches are the trainer's own (same seed, same
data pipeline, same order) for every arm. The step-1 losses of torchao and of lowbit on torchao's
grid are printed side by side: the grids agree element for element but at rounding ties
(tests/quant/test_torchao_parity.py), chiefly a block's negative absmax, which torchao's
``x * (1/scale)`` leaves one code short of the bottom in some blocks and lowbit always puts on it.

Arms per scheme:

* ``torchao``: torchao's fake quant (w4a8 = its 8da4w: int4 g32 symmetric [-8, 7] + int8
  per-token asymmetric activations; int4 per channel; int3 g64), trained with cross-entropy;
* ``lowbit, torchao's grid``: lowbit's fake quant on the same grid (``range: full``, asymmetric
  per-token activations, clipped STE), cross-entropy — the like-for-like check;
* ``lowbit, plain STE`` / ``lowbit, betas 0.95``: that arm with one setting changed — the
  gradient passed past the grid's clip (lowbit's default ``ste``), or AdamW's β2 = 0.95 (lowbit's
  ``train.betas`` default) — two of the causes issue 14 named, measured on their own;
* ``lowbit, restricted range``: that arm on lowbit's restricted grid (codes ±(2^(b-1)-1), scale
  absmax/(2^(b-1)-1)) — what ``range: auto`` picks for int4 per channel, measured in QAT;
* ``lowbit, LSQ (MSE init)``: that arm with learned weight scales started from the clipping ratio
  that minimises each group's squared error (``qat_int3_lsq.yaml``'s weight spec);
* ``lowbit QAD``: the same grid, trained by distillation (forward KL, T = 1) from the float model
  fine-tuned on this data in the same run (``float FT``) — ModelOpt's QAT→QAD recipe;
* ``lowbit QAD + LSQ``: the same, with learned weight scales (LSQ, started on the same grid);
* ``lowbit QAD, self``: distillation from the unfine-tuned float model the student starts from
  (self-distillation; ModelOpt's QAD recipe when no fine-tuned teacher exists);
* ``lowbit QAD, float warm-up``: QAD whose fake quant turns on after 10 float steps (the student
  first distils in float, then 50 steps quantized: the same 60-step budget);
* ``lowbit QAD, student from the FT``: QAD whose student starts from the teacher itself, rounded
  (ModelOpt's deployment recipe: fine-tune in float, quantize that model, distil it back). Every
  QAD arm pays for the float fine-tune (it is the teacher); this one also starts from it, so its
  own PTQ is the fine-tune's (its run's ``val_ppl_ptq``), lower than the scheme's reference PTQ;
* ``lowbit QAD, lr 5e-5 cosine``: QAD at the QAT recipes' optimizer settings (lr 5e-5, 5 warm-up
  steps, cosine decay) instead of torchao's (1e-5 constant); the teacher stays the 1e-5 fine-tune;
* ``lowbit QAD, GPTQ start`` / ``lowbit QAD, student = GPTQ of the FT``: those QAD arms with the
  student's weights first rounded by ``lowbit gptq`` (the same rules, calibrated on the first 128
  training sequences of the same batch order) instead of round-to-nearest; the arm's PTQ is GPTQ's.

    recovered vs FT = (ppl_ptq − ppl_qat) / (ppl_ptq − ppl_float_FT),  ppl_ptq = torchao's PTQ

(one reference PTQ per scheme — round-to-nearest on the scheme's grid, the same for every arm —
so a lower number means a better model, whatever the arm's own start).

    python benchmarks/qat_vs_torchao.py        # the main arms, 3 schemes: ~2.2 h on a 2-core CPU
    python benchmarks/qat_vs_torchao.py --schemes w4a8 --arms lowbit_qad_warmup --reuse   # a lever
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from recipe_runs import ROOT, quality_setup, run_gptq, run_recipe

PROTOCOL = [
    "train.lr=1.0e-5",
    "train.warmup_steps=0",
    "train.schedule=constant",
    "train.betas=[0.9,0.999]",
    "train.weight_decay=0.0",
    "train.seed=0",
    "data.max_val_examples=64",
    "eval.every_steps=0",
    "checkpoint.resume=never",
    "export=null",
]
_ACT = "{preset: w4a8, symmetric: false, ste: clipped}"
LOWBIT_GRIDS = {  # lowbit's spelling of each torchao scheme (the same grid, element for element)
    "w4a8": f"{{match: '*', weight: {{preset: w4a8, range: full, ste: clipped}}, activation: {_ACT}}}",
    "int4_channel": "{match: '*', weight: {dtype: int4, granularity: channel, range: full, ste: clipped}}",
    "int3_g64": "{match: '*', weight: {dtype: int3, granularity: group, group_size: 64, range: full, ste: clipped}}",
}
ARMS = (
    "torchao",
    "lowbit_grid",
    "lowbit_grid_plain_ste",
    "lowbit_grid_betas_095",
    "lowbit_grid_restricted",
    "lowbit_lsq_mse",
    "lowbit_qad",
    "lowbit_qad_lsq",
    "lowbit_qad_self",
    "lowbit_qad_warmup",
    "lowbit_qad_from_ft",
    "lowbit_qad_recipe_lr",
    "lowbit_qad_gptq",
    "lowbit_qad_from_ft_gptq",
)
WARMUP_FLOAT_STEPS = 10
GPTQ_ARMS = ("lowbit_qad_gptq", "lowbit_qad_from_ft_gptq")  # the student starts from `lowbit gptq`'s model


def rules_override(scheme: str) -> str:
    return f"quant={{rules: [{LOWBIT_GRIDS[scheme]}]}}"


def arm_overrides(arm: str, scheme: str, teacher: Path | str, gptq_start: Path | None = None) -> list[str]:
    rules = rules_override(scheme)
    if arm == "torchao":
        return ["eval.at_start=true", f"imports=[{ROOT / 'benchmarks' / 'torchao_arm.py'}]"]
    if arm == "lowbit_grid":
        return ["eval.at_start=false", rules]
    if arm == "lowbit_grid_plain_ste":
        return ["eval.at_start=false", rules.replace("ste: clipped", "ste: plain")]
    if arm == "lowbit_grid_betas_095":
        return ["eval.at_start=false", rules, "train.betas=[0.9,0.95]"]
    if arm == "lowbit_grid_restricted":  # the weight's grid (activations have no full-range choice)
        return ["eval.at_start=false", rules.replace("range: full", "range: restricted", 1)]
    if arm == "lowbit_lsq_mse":  # the weight's spec only
        return [
            "eval.at_start=false",
            rules.replace("ste: clipped}", "ste: clipped, learn_scale: true, scale_init: mse}", 1),
        ]
    if arm.startswith("lowbit_qad"):
        lever = []
        if arm == "lowbit_qad_lsq":  # + learned weight scales (LSQ), initialised on the same grid
            rules = rules.replace("ste: clipped}", "ste: clipped, learn_scale: true}", 1)  # the weight's
        elif arm == "lowbit_qad_self":  # the teacher is the model the student starts from
            teacher = "${model.path}"
        elif arm == "lowbit_qad_warmup":
            lever = [f"quant.enable_after_steps={WARMUP_FLOAT_STEPS}"]
        elif arm == "lowbit_qad_recipe_lr":  # the QAT recipes' optimizer settings (configs/qat_w4a8.yaml)
            lever = ["train.lr=5.0e-5", "train.warmup_steps=5", "train.schedule=cosine"]
        elif arm == "lowbit_qad_from_ft":  # the student starts from the teacher: PTQ of it, then QAD
            lever = [f"model.path={teacher}", "model.config=null"]
        elif arm in GPTQ_ARMS:  # the student starts from GPTQ's rounding (of the model or of the FT)
            lever = [f"model.path={gptq_start}", "model.config=null"]
        elif arm != "lowbit_qad":
            raise ValueError(arm)
        return ["eval.at_start=false", rules, *lever, f"teacher.path={teacher}",
                "loss=[{kind: kd_kl, weight: 1.0, temperature: 1.0}]"]  # fmt: skip
    raise ValueError(arm)


def gptq_start(arm: str, scheme: str, options, teacher: Path, common: list[str], out: Path, log) -> float:
    """``lowbit gptq`` of the arm's start (the pretrained model, or the float FT) on the scheme's
    rules, calibrated on the protocol's batches (``options``: the command line); returns its minutes."""
    source = [f"model.path={teacher}", "model.config=null"] if arm == "lowbit_qad_from_ft_gptq" else []
    return run_gptq(
        options.recipe, [*common, rules_override(scheme), *source], out, options.gptq_samples, log
    )


def step_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and "step" in x]


def recovered(ptq: float, qat: float, reference: float) -> float:
    return (ptq - qat) / (ptq - reference)


ARM_NAMES = {"torchao": "torchao", "lowbit_grid": "lowbit (torchao's grid)",
             "lowbit_grid_plain_ste": "lowbit, plain STE", "lowbit_grid_betas_095": "lowbit, betas 0.95",
             "lowbit_grid_restricted": "lowbit, restricted range", "lowbit_lsq_mse": "lowbit, LSQ (MSE init)",
             "lowbit_qad": "lowbit QAD",
             "lowbit_qad_lsq": "lowbit QAD + LSQ", "lowbit_qad_self": "lowbit QAD, self",
             "lowbit_qad_warmup": "lowbit QAD, float warm-up", "lowbit_qad_from_ft": "lowbit QAD, student from the FT",
             "lowbit_qad_recipe_lr": "lowbit QAD, lr 5e-5 cosine", "lowbit_qad_gptq": "lowbit QAD, GPTQ start",
             "lowbit_qad_from_ft_gptq": "lowbit QAD, student = GPTQ of the FT"}  # fmt: skip


MAIN_ARMS = ("torchao", "lowbit_grid", "lowbit_qad")
LEVER_BASE = {  # each lever arm -> the arm it changes one thing of
    "lowbit_grid_plain_ste": "lowbit_grid", "lowbit_grid_betas_095": "lowbit_grid",
    "lowbit_grid_restricted": "lowbit_grid", "lowbit_lsq_mse": "lowbit_grid",
    "lowbit_qad_lsq": "lowbit_qad", "lowbit_qad_self": "lowbit_qad", "lowbit_qad_warmup": "lowbit_qad",
    "lowbit_qad_from_ft": "lowbit_qad",
    "lowbit_qad_recipe_lr": "lowbit_qad",
    "lowbit_qad_gptq": "lowbit_qad", "lowbit_qad_from_ft_gptq": "lowbit_qad_from_ft",
}  # fmt: skip


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *rows])


def _recovered_cell(arms: dict, arm: str, float_ft: float) -> str:
    ptq = arms.get("torchao", {}).get("ptq")
    return (
        "—" if ptq is None or arm not in arms else f"{100 * recovered(ptq, arms[arm]['qat'], float_ft):.1f}%"
    )


def table(results: dict) -> str:
    """Markdown: float / PTQ, then each main arm's QAT perplexity and recovered vs the float fine-tune."""
    float_ft = results["float"]["ft"]
    head = ["scheme", "float", "float FT", "PTQ torchao", "PTQ lowbit",
            *(f"QAT {ARM_NAMES[arm]}" for arm in MAIN_ARMS), *(f"recovered vs FT, {ARM_NAMES[arm]}" for arm in MAIN_ARMS)]  # fmt: skip
    rows = []
    for scheme, arms in results["schemes"].items():
        ptq = arms.get("torchao", {}).get("ptq")
        lowbit_ptq = arms.get("lowbit_grid", {}).get("ptq")
        rows.append([scheme, f"{results['float']['start']:.2f}", f"{float_ft:.2f}",
                     "—" if ptq is None else f"{ptq:.2f}", "—" if lowbit_ptq is None else f"{lowbit_ptq:.2f}",
                     *(f"{arms[arm]['qat']:.2f}" if arm in arms else "—" for arm in MAIN_ARMS),
                     *(_recovered_cell(arms, arm, float_ft) for arm in MAIN_ARMS)])  # fmt: skip
    return _markdown(head, rows)


def lever_table(results: dict) -> str:
    """Markdown: each lever arm run against the arm it changes one setting of.

    ``recovered vs FT`` measures every arm from the scheme's reference PTQ; ``of its own PTQ gap``
    from the PTQ of the model the arm starts from (the same but for ``student from the FT``).
    """
    float_ft = results["float"]["ft"]
    head = ["scheme", "lever", "changes", "QAT of that arm", "QAT with the lever", "Δ perplexity",
            "recovered vs FT", "its PTQ", "of its own PTQ gap"]  # fmt: skip
    rows = []
    for scheme, arms in results["schemes"].items():
        for lever, base in LEVER_BASE.items():
            if lever in arms and base in arms:
                before, after, own = arms[base]["qat"], arms[lever]["qat"], arms[lever]["ptq"]
                rows.append([scheme, ARM_NAMES[lever], ARM_NAMES[base], f"{before:.2f}", f"{after:.2f}",
                             f"{after - before:+.2f}", _recovered_cell(arms, lever, float_ft),
                             f"{own:.2f}", f"{100 * recovered(own, after, float_ft):.1f}%"])  # fmt: skip
    return _markdown(head, rows)


def main() -> None:
    def options(parser):
        parser.add_argument("--schemes", nargs="*", default=list(LOWBIT_GRIDS), choices=list(LOWBIT_GRIDS))
        parser.add_argument("--arms", nargs="*", default=list(MAIN_ARMS), choices=list(ARMS))
        parser.add_argument("--recipe", default="quickstart.yaml", help="base config (model and data)")
        parser.add_argument("--gptq-samples", type=int, default=128,
                            help="GPTQ arms: calibration sequences (the first steps' rows of the same batch order)")  # fmt: skip
        parser.add_argument(
            "--set", nargs="*", default=[], help="extra overrides for every run (smoke tests)"
        )

    args, runs_dir, results = quality_setup(__doc__, "qat_vs_torchao", default_steps=60, add_options=options)
    common = [*PROTOCOL, f"train.max_steps={args.steps}", *args.set]
    results.setdefault("schemes", {})
    results.update(steps=args.steps, protocol=common)
    out = Path(args.out)
    float_dir = runs_dir / "float_ft"
    teacher = float_dir / "export" / "merged"

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    with open(runs_dir / "runs.log", "a") as log:
        if "float" not in results or not teacher.is_dir():
            floating = run_recipe(args.recipe, float_dir, [*common, "eval.at_start=true",
                                  "export={format: merged, ptq: false}"], log)  # fmt: skip
            results["float"] = {"start": floating["first"]["val_ppl"], "ft": floating["final"]["val_ppl"],
                                "minutes": floating["minutes"], "step_losses": step_losses(float_dir)}  # fmt: skip
            save()
        for scheme in args.schemes:
            arms = results["schemes"].setdefault(scheme, {})
            for arm in args.arms:
                if arm in arms and args.reuse:
                    continue
                run_dir = runs_dir / f"{scheme}_{arm}"
                env = {"LOWBIT_BENCH_TORCHAO": scheme} if arm == "torchao" else {}
                os.environ.pop("LOWBIT_BENCH_TORCHAO", None)
                os.environ.update(env)
                start, gptq_minutes = None, 0.0
                if arm in GPTQ_ARMS:
                    start = runs_dir / f"{scheme}_{arm}_start"
                    gptq_minutes = gptq_start(arm, scheme, args, teacher, common, start, log)
                run = run_recipe(
                    args.recipe, run_dir, [*common, *arm_overrides(arm, scheme, teacher, start)], log
                )
                run["minutes"] += gptq_minutes
                os.environ.pop("LOWBIT_BENCH_TORCHAO", None)
                ptq = run["first"]["val_ppl"] if arm == "torchao" else run["baselines"].get("val_ppl_ptq")
                arms[arm] = {"ptq": ptq, "qat": run["final"]["val_ppl"], "minutes": run["minutes"],
                             "step_losses": step_losses(run_dir)}  # fmt: skip
                save()
                print(f"{scheme} {arm}: PTQ {ptq:.2f} → QAT {run['final']['val_ppl']:.2f} "
                      f"({run['minutes']:.1f} min)", flush=True)  # fmt: skip
    for scheme, arms in results["schemes"].items():
        if "torchao" in arms and "lowbit_grid" in arms:
            a, b = arms["torchao"]["step_losses"][0], arms["lowbit_grid"]["step_losses"][0]
            print(
                f"{scheme}: step-1 loss torchao {a:.6f}, lowbit on torchao's grid {b:.6f} (same batch; grids equal but at torchao's ties)"
            )
    print(table(results))
    print()
    print(lever_table(results))


if __name__ == "__main__":
    main()
