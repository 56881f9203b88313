"""Swap a model's layers for fake-quant ones by config rules (first match wins).

    rules:
      - {match: "model.layers.*.mlp.*", weight: {dtype: int4, granularity: group, group_size: 32}}
      - {match: "re:model\\.layers\\.[0-3]\\..*", skip: true}
      - {match: "*", weight: w4a8, activation: w4a8}

``match`` is a glob on the module's full name, or a regular expression after ``re:``. The output
head and the input embeddings stay in high precision unless ``quantize_head`` /
``quantize_embeddings`` is set. A rule that matches no module is an error: it is almost always a
typo, and silently training an unquantized model is worse than stopping.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from lowbit.quant.modules import BitLinear, FakeQuantEmbedding, FakeQuantizer, FakeQuantLinear
from lowbit.quant.spec import QuantSpec

RULE_FIELDS = {"match", "weight", "activation", "skip"}


@dataclass
class QuantRule:
    """One parsed rule."""

    match: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    skip: bool = False

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], index: int) -> QuantRule:
        unknown = set(entry) - RULE_FIELDS
        if unknown:
            raise ValueError(
                f"quant rule {index}: unknown field(s) {sorted(unknown)}; rule fields: {sorted(RULE_FIELDS)}"
            )
        if "match" not in entry:
            raise ValueError(f"quant rule {index} has no `match` (a glob like 'model.layers.*.mlp.*')")
        skip = bool(entry.get("skip", False))
        weight = entry.get("weight")
        activation = entry.get("activation")
        if not skip and weight is None and activation is None:
            raise ValueError(
                f"quant rule {index} ({entry['match']!r}) sets neither weight, activation nor skip"
            )
        try:
            return cls(
                match=str(entry["match"]),
                weight=None if skip or weight is None else QuantSpec.from_config(weight, "weight"),
                activation=None
                if skip or activation is None
                else QuantSpec.from_config(activation, "activation"),
                skip=skip,
            )
        except ValueError as error:
            raise ValueError(f"quant rule {index} ({entry['match']!r}): {error}") from None

    def matches(self, name: str) -> bool:
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.match)


@dataclass
class RuleReport:
    """What one rule did, for the summary table."""

    rule: QuantRule
    modules: list[str] = field(default_factory=list)
    parameters: int = 0


def _is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"


def _protected(model: nn.Module, quantize_head: bool, quantize_embeddings: bool) -> set[int]:
    """ids of the output head and input embedding modules, unless asked to quantize them."""
    protected = set()
    for getter, allowed in (
        ("get_output_embeddings", quantize_head),
        ("get_input_embeddings", quantize_embeddings),
    ):
        module = getattr(model, getter, lambda: None)()
        if module is not None and not allowed:
            protected.add(id(module))
    return protected


def quantize_model(
    model: nn.Module,
    rules: Sequence[Mapping[str, Any]],
    quantize_head: bool = False,
    quantize_embeddings: bool = False,
) -> list[RuleReport]:
    """Replace matching layers of ``model`` in place; return one report per rule."""
    parsed = [QuantRule.from_config(entry, index) for index, entry in enumerate(rules)]
    if not parsed:
        raise ValueError("quant.rules is empty; add e.g. {match: '*', weight: w4a8}")
    reports = [RuleReport(rule) for rule in parsed]
    protected = _protected(model, quantize_head, quantize_embeddings)
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not _is_quantizable(module) or id(module) in protected:
            continue
        report = next((r for r in reports if r.rule.matches(name)), None)
        if report is None:
            continue
        report.modules.append(name)
        report.parameters += sum(p.numel() for p in module.parameters(recurse=False))
        if not report.rule.skip:
            replacements.append((name, _fake_quant_version(name, module, report.rule)))
    for index, report in enumerate(reports):
        if not report.modules:
            raise ValueError(
                _shadowed_message(reports, index) or _no_match_message(model, report.rule, protected)
            )
    for name, replacement in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return reports


def _fake_quant_version(name: str, module: nn.Module, rule: QuantRule) -> nn.Module:
    try:
        if isinstance(module, nn.Embedding):
            if rule.weight is None:
                raise ValueError("an embedding has no input activations to quantize; give a weight spec")
            if rule.activation is not None:
                raise ValueError("an embedding's input is token ids: drop `activation` for it")
            if rule.weight.dtype == "ternary":
                raise ValueError(
                    "ternary weights are for linear layers (BitNet keeps the embeddings in high precision, "
                    "and no BitNet runtime reads a ternary table): skip the embeddings or give them an int8 spec"
                )
            return FakeQuantEmbedding.from_embedding(module, rule.weight)
        if rule.weight is not None and rule.weight.dtype == "ternary":
            return BitLinear.from_linear(module, rule.weight, rule.activation)
        return FakeQuantLinear.from_linear(module, rule.weight, rule.activation)
    except ValueError as error:
        raise ValueError(f"quant rule {rule.match!r} on {name} ({type(module).__name__}): {error}") from None


def _shadowed_message(reports: Sequence[RuleReport], index: int) -> str | None:
    """Why rule ``index`` got nothing, when earlier rules took every module it matches."""
    rule = reports[index].rule
    for earlier in reports[:index]:
        taken = [name for name in earlier.modules if rule.matches(name)]
        if taken:
            return (f"quant rule {rule.match!r} (rule {index}) gets no module: the earlier rule {earlier.rule.match!r} "
                    f"already takes {taken[0]}{f' and {len(taken) - 1} more' if len(taken) > 1 else ''} it matches. Rules "
                    f"are first-match: put {rule.match!r} before {earlier.rule.match!r}")  # fmt: skip
    return None


def _no_match_message(model: nn.Module, rule: QuantRule, protected: set[int]) -> str:
    names = [n for n, _ in model.named_modules() if n]
    other = [n for n, m in model.named_modules() if n and rule.matches(n)]
    if other:
        module = model.get_submodule(other[0])
        if id(module) in protected:
            return (f"quant rule {rule.match!r} matches only {other[0]}, the output head or input embeddings, which "
                    "stay in high precision; set quant.quantize_head / quant.quantize_embeddings to quantize them")  # fmt: skip
        return (f"quant rule {rule.match!r} matches {other[0]} ({type(module).__name__}), a module type that cannot "
                "be quantized: rules apply to nn.Linear, transformers Conv1D and nn.Embedding; "
                f"match its layers instead, e.g. {other[0]}.*")  # fmt: skip
    quantizable = [n for n, m in model.named_modules() if n and _is_quantizable(m) and id(m) not in protected]
    return (f"quant rule {rule.match!r} matches no module (a typo?). Some quantizable modules: "
            f"{', '.join(quantizable[:6])}{' ...' if len(quantizable) > 6 else ''} ({len(names)} modules in all)")  # fmt: skip


def summary_table(reports: Sequence[RuleReport]) -> str:
    """The table printed after applying: rule → modules, parameters, scheme, bits/weight."""
    rows = [("rule", "modules", "params", "weight", "activation", "bits/weight")]
    for report in reports:
        rule = report.rule
        weight = "skip" if rule.skip else (rule.weight.describe() if rule.weight else "float")
        activation = "-" if rule.skip or rule.activation is None else rule.activation.describe()
        bits = f"{rule.weight.bits_per_weight:.2f}" if rule.weight and not rule.skip else "16/32"
        rows.append(
            (rule.match, str(len(report.modules)), f"{report.parameters:,}", weight, activation, bits)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Every fake quantizer in ``model``."""
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


def quant_grids(model: nn.Module, before_auto: bool = False) -> list[str]:
    """Each distinct grid the model's quantizers compute (``int4 g32 sym full``...), sorted: what a
    checkpoint records so a resume cannot continue on another grid. ``before_auto``: the grids a
    lowbit without ``range: auto`` computed for the same rules (an unset range was restricted)."""
    specs = (q.spec for q in quantizers(model))
    if before_auto:
        specs = (replace(s, range="restricted") if s.range == "auto" else s for s in specs)
    return sorted({s.describe() for s in specs})


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn all fake quant on (QAT, PTQ) or off (the float model) without touching weights."""
    for quantizer in quantizers(model):
        quantizer.enabled = enabled


def set_quantizer_blend(model: nn.Module, weights: float | None, activations: float | None) -> None:
    """Set the warm-up blend λ of every weight quantizer and/or activation quantizer (None: leave)."""
    for module in model.modules():
        for attribute, blend in (("weight_quantizer", weights), ("activation_quantizer", activations)):
            quantizer = getattr(module, attribute, None)
            if blend is not None and isinstance(quantizer, FakeQuantizer):
                quantizer.blend = float(blend)


def freeze_scales(model: nn.Module) -> None:
    for quantizer in quantizers(model):
        quantizer.freeze_scales()


def initialize_scales(model: nn.Module) -> None:
    """Set every learned (LSQ) scale and offset from the weight it quantizes, as at construction.

    For models built on the meta device: their quantizers get scales of the right shape but no
    values, so call this once the real weights are loaded (before sharding: the scales come from
    whole tensors).
    """
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(quantizer, FakeQuantizer) and quantizer.scale is not None:
            quantizer.initialize_from(module.weight)
