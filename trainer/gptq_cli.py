"""``lowbit gptq``: GPTQ of a configured model onto its quant rules' grids, written as a float model.

    lowbit gptq configs/qad_w4a8.yaml --out gptq_start [--samples 128] [key=value ...]

Runs the recipe's model (float, fake quant off) over the first ``--samples`` training sequences
the recipe's data pipeline yields, collects each quantized Linear's input Hessian ``Σ x xᵀ``,
rounds every such layer with GPTQ (``lowbit.quant.gptq``: the rule's own grid, scales fixed per
block from the original weight, activation order) and writes a plain Hugging Face float model
whose weights fake-quantize to exactly GPTQ's codes under the same rules, plus ``gptq.json`` (each
layer's output error, GPTQ vs round-to-nearest). That model is

* a better PTQ: ``lowbit export gptq_start --format ... --ptq SCHEME`` or ``lowbit eval`` with the rules;
* a better start for QAT/QAD: ``lowbit train RECIPE model.path=gptq_start teacher.path=FLOAT``
  (the student's first forward is GPTQ's model; keep the teacher on the float model).

The Hessians come from the float model in one pass (every layer sees float inputs), not layer by
layer through already-rounded layers: one forward per batch, and the same inputs the QAT that
follows starts from. Quantized embeddings keep round-to-nearest (an embedding has no input to
weigh its errors by).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.trainer.errors import UserError

REPORT = "gptq.json"


def _refuse_unsupported(cfg) -> None:
    if cfg.quant is None:
        raise UserError("gptq rounds onto the recipe's quant rules: add a `quant` section (e.g. rules: "
                        "[{match: '*', weight: w4a8}]) or pass quant.rules=[...]")  # fmt: skip
    if cfg.lora is not None:
        raise UserError("gptq rounds a QAT model's weights; a LoRA/QLoRA recipe freezes its base (set lora=null "
                        "to round the base, then train adapters on the result)")  # fmt: skip
    if cfg.model.subln:
        raise UserError("gptq writes a Hugging Face model of the original architecture: model.subln adds norms it "
                        "cannot hold; use it on recipes without subln")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("gptq runs in one process (its Hessians are one model's): start it without torchrun")


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quant Linears GPTQ rounds; refuses (listing them) any whose grid it cannot."""
    from lowbit.quant import FakeQuantLinear
    from lowbit.quant.gptq import gptq_problem

    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantLinear) and module.weight_quantizer is not None
    }
    if not targets:
        raise UserError("the quant rules quantize no Linear weight: nothing for GPTQ to round")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = [name for name, m in targets.items() if embeddings is not None and m.weight is embeddings.weight]
    if tied:
        raise UserError(f"{tied[0]} shares its weight with the input embeddings (a tied head): GPTQ would rewrite "
                        "the embeddings too; leave the head out of the rules (quant.quantize_head=false)")  # fmt: skip
    problems = {name: gptq_problem(m.weight_quantizer.spec) for name, m in targets.items()}
    problems = {name: problem for name, problem in problems.items() if problem}
    if problems:
        name, problem = next(iter(problems.items()))
        raise UserError(f"{len(problems)} layers cannot be rounded by GPTQ, e.g. {name}: {problem}")
    return targets


@torch.no_grad()
def _hessians(
    model: nn.Module, targets: dict[str, nn.Module], data, cfg, samples: int, device
) -> tuple[dict, int]:
    """Each target's ``Σ x xᵀ`` over the first ``samples`` training rows (padding left out).

    Layers that read one tensor (q/k/v, gate/up) share one accumulator: the Hessians of every layer
    are held at once, in float64, so this sets the memory (SmolLM2-135M, by its shapes: 30 × (3 · 576² +
    1536²) · 8 bytes = 0.8 GB)."""
    from lowbit.quant import set_quantizers_enabled
    from lowbit.quant.gptq import HessianAccumulator, input_gram
    from lowbit.trainer.data import model_inputs

    available = len(data.rows) if data.rows is not None else None
    if available is not None and samples > available:
        raise UserError(
            f"--samples {samples}: the training data holds {available} sequences; pass --samples {available}"
        )
    sums: dict[str, HessianAccumulator] = {}
    owners: dict[str, str] = {}  # layer -> the layer whose accumulator it shares
    current: dict[str, Any] = {"mask": None, "input": None, "owner": None}

    def record(name: str, inputs: torch.Tensor) -> None:
        owner = current["owner"] if inputs is current["input"] else name
        if owners.setdefault(name, owner) != owner:
            raise RuntimeError(f"GPTQ calibration: {name} read another layer's input than in the first batch")
        if owner == name:
            current.update(input=inputs, owner=name)
            sums.setdefault(name, HessianAccumulator(inputs.shape[-1])).add(
                *input_gram(inputs, current["mask"])
            )

    handles = [
        module.register_forward_pre_hook(lambda _, args, name=name: record(name, args[0]))
        for name, module in targets.items()
    ]
    batch_size = cfg.train.micro_batch_size
    batches = data.batches(batch_size, 1, 1, 0, cfg.train.seed)
    model.eval()
    set_quantizers_enabled(model, False)
    rows = 0
    try:
        for step in range(-(-samples // batch_size)):
            batch = {key: value.to(device) for key, value in batches.micro_batches(step)[0].items()}
            mask = batch.get("attention_mask")
            current.update(mask=None if mask is None else mask.bool(), input=None, owner=None)
            model(**model_inputs(batch))
            rows += next(iter(batch.values())).shape[0]
    finally:
        for handle in handles:
            handle.remove()
        current.clear()
        set_quantizers_enabled(model, True)
    unused = [name for name in targets if name not in owners]
    if unused:
        raise UserError(f"{unused[0]} (and {len(unused) - 1} more) got no input in the calibration forward: "
                        "leave layers the model never calls out of the quant rules")  # fmt: skip
    return {name: sums[owners[name]] for name in targets}, rows


def run_gptq(config: str, overrides: list[str], out: Path, samples: int = 128, damp: float = 0.01,
             act_order: bool = True, overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """GPTQ of ``config``'s model onto its quant rules, written to ``out``; returns the report."""
    from lowbit.quant import FakeQuantEmbedding, FakeQuantLinear
    from lowbit.quant.formats import collect, hf_float
    from lowbit.quant.gptq import gptq_weight
    from lowbit.trainer.build import build_model_and_data, seed_everything
    from lowbit.trainer.config import load_config
    from lowbit.trainer.export import _check_output, _place, _remove
    from lowbit.trainer.lora import replace_module
    from lowbit.trainer.strategies import inference_strategy
    from lowbit.trainer.transforms import apply_transforms

    if samples < 1 or not 0 < damp < 1:
        raise UserError(
            f"--samples {samples} / --damp {damp}: give at least 1 sample and a damping in (0, 1)"
        )
    cfg = load_config(config, overrides)
    _refuse_unsupported(cfg)
    out = _check_output(out, Path(cfg.model.path or config), False, overwrite)
    strategy = inference_strategy(cfg.strategy, cfg.train)
    started = time.perf_counter()
    try:
        seed_everything(cfg.train.seed)
        built = build_model_and_data(cfg, strategy, with_teacher=False)
        model = built.model
        originals = dict(model.named_modules())
        apply_transforms(model, cfg, announce=True, skip=("compile",))
        targets = _targets(model)
        model.to(strategy.device)
        sums, rows = _hessians(model, targets, built.data, cfg, samples, strategy.device)
        layers = {}
        for name, module in targets.items():
            spec = module.weight_quantizer.spec
            try:
                result = gptq_weight(module.weight.detach().cpu(), sums[name].sum, spec, damp, act_order)
            except torch.linalg.LinAlgError:
                raise UserError(f"{name}: its damped input Hessian is not positive definite (too few calibration "
                                f"tokens for its {module.in_features} inputs?); raise --damp (now {damp}) or "
                                "--samples") from None  # fmt: skip
            except RuntimeError as error:  # the held weight would not reproduce GPTQ's rounding
                raise UserError(f"{name}: {error} (model.dtype=fp32)") from None
            module.weight.data.copy_(result.weight.to(module.weight.device))
            layers[name] = {"spec": spec.describe(), "error": result.error, "rtn_error": result.rtn_error}
        # back to the model's own layers, which hold GPTQ's weights
        for name, module in list(model.named_modules()):
            if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)):
                original = originals[name]
                if original.weight is not module.weight:  # (a Conv1D's [in, out] weight was copied)
                    original.weight.data.copy_(module.weight.data.T)
                replace_module(model, name, original)
        report = {
            "config": str(config), "overrides": overrides, "samples": rows, "damp": damp, "act_order": act_order,
            "dtype": str(next(iter(targets.values())).weight.dtype).removeprefix("torch."),
            "tokens": max(s.tokens for s in sums.values()), "seconds": round(time.perf_counter() - started, 1),
            "layers": layers,
        }  # fmt: skip
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        try:
            staging.mkdir()
            hf_float.write(collect(model.cpu(), built.tokenizer), staging)
            (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
            _place(staging, out)
        finally:
            _remove(staging)
    finally:
        strategy.teardown()
    return report


def summary(report: dict[str, Any], out: Path) -> str:
    """What the run did, the layers that lose most, and the commands that use the result."""
    layers = report["layers"]
    mean = lambda key: sum(layer[key] for layer in layers.values()) / len(layers)  # noqa: E731
    worst = sorted(layers.items(), key=lambda item: -item[1]["error"])[:3]
    lines = [
        f"GPTQ of {len(layers)} layers on {report['samples']} sequences ({report['tokens']:,} tokens) in "
        f"{report['seconds']:.0f}s",
        f"output error (share of each layer's output energy lost, mean over layers): GPTQ {mean('error'):.3e}, "
        f"round-to-nearest {mean('rtn_error'):.3e} ({mean('rtn_error') / max(mean('error'), 1e-300):.1f}x)",
        *(
            f"  {name} ({layer['spec']}): {layer['error']:.3e} vs {layer['rtn_error']:.3e}"
            for name, layer in worst
        ),
        f"wrote {out} ({report['dtype']} weights on the grid — read them in {report['dtype']}: another dtype "
        f"re-rounds some codes; {REPORT}: every layer)",
        f"next: train from it with model.path={out} (keep teacher.path on the float model), or export it with --ptq",
    ]
    return "\n".join(lines)


__all__ = ["REPORT", "run_gptq", "summary"]
