"""Distillation quality on a real model: SmolLM2-135M teaching (a) a 15-layer student and (b) its
own w4a8 fake-quant copy (QAD), State of the Union text, the same data, steps and seed per row.

(a) student initialised from every other teacher layer, trained with CE only / CE + forward KL /
    CE + forward KL + hidden-state cosine (configs/kd_smollm2_15layer.yaml's terms);
(b) QAD: the qad_w4a8.yaml recipe; its ``recovered`` is compared with the QAT-only run of
    benchmarks/qat_quality.py (same scheme, steps, lr, seed), read from that run's results file.
    Two teachers: the pretrained model itself, and (``--ft-teacher``) the float model fine-tuned
    on the same text by qat_quality.py — the fair teacher when the metric is in-domain perplexity.

    python benchmarks/kd_quality.py --student-steps 30 --qad-steps 60 --ft-teacher runs/qat_quality/float_ft
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from recipe_runs import ROOT, run_recipe

STUDENT_LOSSES = {
    "CE only": "loss=[{kind: ce, weight: 1.0}]",
    "KD (forward KL, T=2)": "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]",
    "KD + hidden (cosine)": (
        "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}, "
        "{kind: hidden, weight: 0.5, layer_map: [[5, 10], [10, 20], [15, 30]], distance: cosine}]"
    ),
}


def hf_dir_of_run(run_dir: Path, target: Path) -> Path:
    """Save a float run's newest checkpoint as a Hugging Face directory (to serve as a teacher)."""
    from lowbit.trainer.export import load_source

    loaded = load_source(run_dir, [])
    model, tokenizer = loaded.model, loaded.tokenizer
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student-steps", type=int, default=30)
    parser.add_argument("--qad-steps", type=int, default=60)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "kd_quality"))
    parser.add_argument("--qat-results", default=str(ROOT / "benchmarks" / "results" / "qat_quality.json"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kd_quality.json"))
    parser.add_argument("--only-qad", action="store_true", help="keep the student rows already in --out")
    parser.add_argument(
        "--ft-teacher", help="a float fine-tuning run dir (qat_quality.py's float_ft) as a 2nd teacher"
    )
    parser.add_argument("--skip-pretrained-teacher", action="store_true", help="keep that QAD row from --out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"student_steps": args.student_steps, "qad_steps": args.qad_steps, "students": {}}
    if args.only_qad:
        previous = json.loads(Path(args.out).read_text())
        results.update(student_steps=previous["student_steps"], students=previous["students"])
        if args.skip_pretrained_teacher:
            results["qad"] = previous["qad"]
    with open(runs_dir / "runs.log", "w") as log:
        common = [f"train.max_steps={args.student_steps}", "eval.every_steps=0", "eval.at_start=true"]
        for name, loss in STUDENT_LOSSES.items() if not args.only_qad else ():
            slug = name.split(" (")[0].replace(" ", "_").replace("+", "plus")
            r = run_recipe("kd_smollm2_15layer.yaml", runs_dir / f"student_{slug}", [*common, loss], log)
            results["students"][name] = {
                "start": r["first"]["val_ppl"],
                "final": r["final"]["val_ppl"],
                "minutes": r["minutes"],
            }
            Path(args.out).write_text(json.dumps(results, indent=2))
        teachers = {} if args.skip_pretrained_teacher else {"qad": []}
        if args.ft_teacher:
            teachers["qad_ft_teacher"] = [
                f"teacher.path={hf_dir_of_run(Path(args.ft_teacher), runs_dir / 'ft_teacher')}"
            ]
        for key, teacher in teachers.items():
            qad = run_recipe(
                "qad_w4a8.yaml",
                runs_dir / key,
                [f"train.max_steps={args.qad_steps}", "eval.every_steps=0", "export=null", *teacher],
                log,
            )
            base, final = qad["baselines"], qad["final"]["val_ppl"]
            results[key] = {"float": base["val_ppl_float"], "ptq": base["val_ppl_ptq"], "qad": final,
                            "recovered": (base["val_ppl_ptq"] - final) / (base["val_ppl_ptq"] - base["val_ppl_float"]),
                            "minutes": qad["minutes"]}  # fmt: skip
            Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n(a) 15-layer student from SmolLM2-135M, {results['student_steps']} steps x 1024 tokens")
    print(f"{'loss':<24} | {'ppl at init':>11} | {'ppl after':>9}")
    for name, r in results["students"].items():
        print(f"{name:<24} | {r['start']:>11.1f} | {r['final']:>9.2f}")
    qat = json.loads(Path(args.qat_results).read_text()) if Path(args.qat_results).is_file() else None
    q = results["qad"]
    print(f"\n(b) w4a8, {args.qad_steps} steps: float {q['float']:.2f}, PTQ {q['ptq']:.2f}")
    if qat is not None:
        w4a8 = next(v for k, v in qat["schemes"].items() if k.startswith("w4a8"))
        print(f"QAT (CE)   ppl {w4a8['qat']:.2f}  recovered {100 * w4a8['recovered']:.1f}%")
    print(f"QAD (CE+KD, pretrained teacher) ppl {q['qad']:.2f}  recovered {100 * q['recovered']:.1f}%")
    if "qad_ft_teacher" in results:
        q = results["qad_ft_teacher"]
        print(f"QAD (CE+KD, fine-tuned teacher) ppl {q['qad']:.2f}  recovered {100 * q['recovered']:.1f}%")


if __name__ == "__main__":
    main()
