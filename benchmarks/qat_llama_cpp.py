"""QAT for llama.cpp, judged by llama.cpp: every exported GGUF scored by the engine itself.

The protocol of ``qat_vs_torchao.py`` (SmolLM2-135M-Instruct, State of the Union, 60 steps × 4 ×
256 tokens, AdamW lr 1e-5 constant, betas (0.9, 0.999), seed 0); its float fine-tune is reused
when ``--float-run`` holds it (else trained here). Files:

* ``float FT (f16)``: the fine-tuned float model as an f16 GGUF — the reference;
* ``PTQ q4_0 / q4_1``: the same model rounded by ``lowbit export --ptq`` (byte-identical to
  ``llama-quantize``'s tensors from the same weights, tested);
* ``QAT q4_0 / q4_1``: trained on llama.cpp's own grid with cross-entropy, exported exactly;
* ``QAD q4_0 / q4_1``: the same grid trained by distillation (forward KL, T = 1) from the float
  fine-tune — the loss of ``qat_vs_torchao.py``'s QAD arms;
* ``QAD from the FT``: the same, with the student started from the fine-tune itself (ModelOpt's
  deployment recipe: fine-tune in float, round that model, distil it back into the grid) — the
  arm that measures quantization recovery of *that* model alone: the QAT and QAD arms start from
  the pretrained model and must learn the fine-tune's data in the same 60 steps;
* ``QAD from the FT, Q8_0 activations``: that, with llama.cpp's run-time rounding of each matmul's
  input to Q8_0 blocks in the training forward (``activation: gguf_q8_0``);
* ``QAD recipe``: ``configs/qad_gguf_q4_0.yaml`` as shipped (that arm at the QAT recipes' optimizer
  settings: lr 5e-5, 5 warm-up steps, cosine, betas (0.9, 0.95)), on this protocol's data: the float
  FT rounded by ``lowbit gptq`` on the recipe's rules (calibrated on the first 128 training
  sequences; also exported as it is, ``--ptq``: the ``GPTQ q4_0`` row) and distilled from the FT;
  ``recipe``: the same from the FT's round-to-nearest (the recipe before GPTQ).

Each file is run by llama.cpp (``llama-cpp-python``, built from source) on the same 64 validation
blocks of 256 tokens that lowbit's eval reads, each block from an empty context; perplexity =
exp(mean NLL of tokens 2..256 given their prefix). llama.cpp's matmuls round activations to Q8_0
blocks, so its numbers are the deployed model's, not the fake-quant model's (both printed).

    gap closed = (ppl_PTQ − ppl_QAT) / (ppl_PTQ − ppl_f16)        (all three from llama.cpp)

    python benchmarks/qat_llama_cpp.py --float-run runs/qat_vs_torchao/float_ft --grids q4_0 --arms qad_ft recipe

(on a 2-core CPU each arm trains in 11-16 min, and llama.cpp scores a file in about a minute;
every arm on both grids: ~2 h.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from qat_vs_torchao import PROTOCOL
from recipe_runs import ROOT, quality_setup, run_gptq, run_recipe

GRIDS = ("q4_0", "q4_1")
_KD = "loss=[{kind: kd_kl, weight: 1.0, temperature: 1.0}]"


def _rules(grid: str, activations: bool = False) -> str:
    """The weights on llama.cpp's grid; with ``activations`` also its run-time Q8_0 rounding of each
    matmul's input (``activation: gguf_q8_0``), so training sees what the deployed model computes."""
    activation = ", activation: gguf_q8_0" if activations else ""
    return f"quant={{rules: [{{match: '*', weight: gguf_{grid}{activation}}}]}}"


def _from_ft(teacher: Path, grid: str, activations: bool) -> list[str]:
    """QAD whose student starts from the teacher (the float FT) itself."""
    return [
        _rules(grid, activations),
        f"teacher.path={teacher}",
        _KD,
        f"model.path={teacher}",
        "model.config=null",
    ]


ARMS = {  # arm -> (row name, overrides given the teacher and the grid); teacher = the float FT's export
    "qat": ("QAT", lambda teacher, grid: [_rules(grid)]),
    "qad": ("QAD", lambda teacher, grid: [_rules(grid), f"teacher.path={teacher}", _KD]),
    "qad_ft": ("QAD from the FT", lambda teacher, grid: _from_ft(teacher, grid, False)),
    "qad_ft_a8": ("QAD from the FT, Q8_0 activations", lambda teacher, grid: _from_ft(teacher, grid, True)),
}  # fmt: skip
# arm -> (row name, recipe, its grid): a shipped recipe run as it is — its own optimizer settings, not
# the protocol's — on the protocol's data and evaluation, started from (and taught by) the float FT
RECIPE_ARMS = {
    "recipe": ("QAD recipe from the FT's round-to-nearest", "qad_gguf_q4_0.yaml", "q4_0"),
    "recipe_gptq": ("QAD recipe (qad_gguf_q4_0.yaml, GPTQ start)", "qad_gguf_q4_0.yaml", "q4_0"),
}
# the student starts from `lowbit gptq` of the float FT (the teacher stays the FT)
GPTQ_ARMS = ("recipe_gptq",)
GPTQ_SAMPLES = 128  # the first 32 steps' sequences of the run's own batch order
OPTIMIZER = ("train.lr=", "train.warmup_steps=", "train.schedule=", "train.betas=")


def export(run_dir: Path, fmt: str, out: Path, ptq: bool) -> Path:
    args = [
        sys.executable,
        "-m",
        "lowbit.trainer",
        "export",
        str(run_dir),
        "--format",
        fmt,
        "--out",
        str(out),
        "--overwrite",
    ]
    done = subprocess.run([*args, *(["--ptq"] if ptq else [])], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"export {run_dir} {fmt} failed:\n{done.stderr[-3000:]}")
    return out


def validation_blocks(recipe: str, overrides: list[str]) -> list[list[int]]:
    """The token ids of the validation rows lowbit's eval reads (the same config, the same cache)."""
    from lowbit.trainer.config import load_config
    from lowbit.trainer.data import load_data
    from lowbit.trainer.model import build_tokenizer, resolve_model_dir

    cfg = load_config(ROOT / "configs" / recipe, overrides)
    tokenizer = build_tokenizer(cfg.model, resolve_model_dir(cfg.model))
    val = load_data(cfg.data, tokenizer, cfg.train.seed, show=False).val
    assert val is not None, "the recipe has no validation data"
    batch = val.batch(range(len(val)))
    return [row[mask].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"].bool())]


def llama_cpp_perplexity(gguf: Path, blocks: list[list[int]]) -> float:
    """exp(mean NLL) of every token after the first of each block, from llama.cpp's logits."""
    import llama_cpp

    n_ctx = max(len(b) for b in blocks)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    total, count = 0.0, 0
    try:
        for ids in blocks:
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            total += float((log_norm - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
            count += len(ids) - 1
    finally:
        llm.close()
    return math.exp(total / count)


def main() -> None:
    def options(parser):
        parser.add_argument(
            "--float-run", default=None, help="a float fine-tune of this protocol (qat_vs_torchao's)"
        )
        parser.add_argument("--grids", nargs="*", default=list(GRIDS), choices=GRIDS)
        parser.add_argument("--arms", nargs="*", default=[*ARMS, *RECIPE_ARMS], choices=[*ARMS, *RECIPE_ARMS])
        parser.add_argument("--recipe", default="quickstart.yaml")
        parser.add_argument(
            "--set", nargs="*", default=[], help="extra overrides for every run (smoke tests)"
        )

    args, runs_dir, results = quality_setup(__doc__, "qat_llama_cpp", default_steps=60, add_options=options)
    common = [*PROTOCOL, f"train.max_steps={args.steps}", *args.set]
    results.update(steps=args.steps, protocol=common)
    results.setdefault("files", {})
    float_run = Path(args.float_run) if args.float_run else runs_dir / "float_ft"
    teacher = float_run / "export" / "merged"
    out = Path(args.out)
    files = runs_dir / "gguf"
    files.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")

    blocks = validation_blocks(args.recipe, common)
    with open(runs_dir / "runs.log", "a") as log:
        if not teacher.is_dir():
            run_recipe(args.recipe, float_run, [*common, "export={format: merged, ptq: false}"], log)
        made = {
            "float FT (f16)": (
                float_run,
                export(float_run, "gguf-f16", files / "float_ft-f16.gguf", False),
                None,
            )
        }
        for grid in args.grids:
            made[f"PTQ {grid}"] = (
                float_run,
                export(float_run, f"gguf-{grid}", files / f"ptq-{grid}.gguf", True),
                None,
            )
            for arm in args.arms:
                run_dir = runs_dir / f"{arm}_{grid}"
                if arm in RECIPE_ARMS:
                    row, recipe, recipe_grid = RECIPE_ARMS[arm]
                    if grid != recipe_grid:
                        continue
                    protocol = [o for o in common if not o.startswith(OPTIMIZER)]
                    start = teacher
                    if arm in GPTQ_ARMS:
                        start = runs_dir / f"{arm}_{grid}_start"
                        run_gptq(recipe, [*protocol, f"model.path={teacher}"], start, GPTQ_SAMPLES, log)
                        gptq_file = export(start, f"gguf-{grid}", files / f"gptq-{grid}.gguf", True)
                        made[f"GPTQ {grid}"] = (start, gptq_file, None)
                    run = run_recipe(
                        recipe, run_dir, [*protocol, f"model.path={start}", f"teacher.path={teacher}"], log
                    )
                else:
                    row, overrides = ARMS[arm]
                    run = run_recipe(
                        args.recipe, run_dir, [*common, "eval.at_start=false", *overrides(teacher, grid)], log
                    )
                gguf = export(run_dir, f"gguf-{grid}", files / f"{arm}-{grid}.gguf", False)
                made[f"{row} {grid}"] = (run_dir, gguf, run["final"]["val_ppl"])
        for name, (_, gguf, lowbit_ppl) in made.items():
            results["files"][name] = {
                "llama_cpp_ppl": llama_cpp_perplexity(gguf, blocks),
                "lowbit_ppl": lowbit_ppl,
                "mib": gguf.stat().st_size / 2**20,
            }
            save()
            print(f"{name}: llama.cpp perplexity {results['files'][name]['llama_cpp_ppl']:.3f}", flush=True)
    rows = results["files"]
    reference = rows["float FT (f16)"]["llama_cpp_ppl"]
    print("\n| file | MiB | perplexity (llama.cpp) | lowbit fake-quant | gap closed |\n|---|---|---|---|---|")
    for name, row in rows.items():
        grid = name.split()[-1]
        ptq = rows.get(f"PTQ {grid}", {}).get("llama_cpp_ppl")
        closed = "—"
        if name.startswith(("QAT", "QAD", "GPTQ")) and ptq is not None:
            closed = f"{100 * (ptq - row['llama_cpp_ppl']) / (ptq - reference):.1f}%"
        lowbit = "—" if row["lowbit_ppl"] is None else f"{row['lowbit_ppl']:.2f}"
        print(f"| {name} | {row['mib']:.1f} | {row['llama_cpp_ppl']:.2f} | {lowbit} | {closed} |")


if __name__ == "__main__":
    main()
