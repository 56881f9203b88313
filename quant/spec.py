"""What a quantizer does to a tensor: ``QuantSpec`` and the presets that equal real formats' grids.

A spec names the number format (``dtype``), which elements share a scale (``granularity``,
``group_size``), symmetric or zero-point quantization, how the stored scale is rounded, and —
for presets of file formats — the exact rounding convention of that format, so that a preset's
fake-quant output is bit for bit what the exporter writes and a reader dequantizes.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

INT_BITS = {f"int{bits}": bits for bits in range(2, 9)}
FLOAT8 = ("fp8_e4m3", "fp8_e5m2")
DTYPES = (*INT_BITS, *FLOAT8, "nf4", "ternary")
GRANULARITIES = ("tensor", "channel", "group", "token")
CONVENTIONS = ("default", "gguf_q8_0", "gguf_q4_0", "gguf_q4_1")
SCALE_DTYPES = ("fp32", "fp16", "bf16")
STES = ("plain", "clipped")
SCALE_INITS = ("minmax", "mse")
RANGES = ("auto", "restricted", "full")


def auto_range(spec: QuantSpec) -> str:
    """The symmetric range ``range: auto`` picks, as measured on SmolLM2-135M (README, QAT).

    Full where training on it ends lower: every int2/int3 grid (the restricted one wastes a third
    and an eighth of the codes; squared error 1.7-1.9× and 1.1-1.3× the full one's, int3 g64 PTQ
    perplexity 172 → 116), int4 in groups of 32 or more (1.05-1.12×; int4 g32 PTQ 31.0 → 30.0) and
    int4 per channel — there PTQ prefers restricted (46.0 vs 47.9: the full grid clips a row's
    positive absmax, its salient outlier) but QAT on the full grid ends lower (27.98 vs 28.87 on
    ``benchmarks/qat_vs_torchao.py``), and QAT is what this grid is trained for. Restricted
    elsewhere: int4 g16 (0.93×), 5-8 bits (within 0.83-1.06×; what int8 kernels compute),
    per-token activations (vLLM divides by 127), and every grid the choice does not apply to
    (asymmetric, fp8, nf4, ternary, file formats). ``benchmarks/grid_range.py`` prints the table.
    """
    if not (spec.dtype in INT_BITS and spec.symmetric and spec.convention == "default"):
        return "restricted"
    bits = INT_BITS[spec.dtype]
    if spec.granularity == "token":
        return "restricted"
    if bits <= 3:
        return "full"
    if bits == 4 and (
        spec.granularity == "channel" or (spec.granularity == "group" and (spec.group_size or 0) >= 32)
    ):
        return "full"
    return "restricted"


def _choose(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean: {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {field} {value!r}.{hint} Valid: {', '.join(allowed)}")


@dataclass(frozen=True)
class QuantSpec:
    """How to fake-quantize (and later store) one tensor.

    Args:
        dtype: ``int2``…``int8``, ``fp8_e4m3``, ``fp8_e5m2``, ``nf4`` or ``ternary``.
        granularity: which elements share a scale: ``tensor``; ``channel`` (each output row of a
            weight); ``group`` (``group_size`` consecutive elements along the last, input dim);
            ``token`` (each row of an activation, computed on the fly).
        group_size: elements per group for ``granularity="group"``; must divide the last dim.
        symmetric: scale only (zero maps to zero) or scale + integer zero point (ints only).
        scale_dtype: the stored scale is rounded to this dtype before use (fp16 for GGUF).
        convention: ``default``, or the exact arithmetic of a file format (``gguf_q4_0``...).
        ste: ``plain`` straight-through gradient, or ``clipped`` (zero outside the grid's range).
        learn_scale: learn the scale (LSQ; with ``symmetric=False`` also the offset, LSQ+).
        scale_init: ``minmax`` (absmax / min-max) or ``mse`` (clipping ratio that minimises
            the quantization error), for learned scales.
        range: symmetric integer codes in ``restricted`` [-(2^(b-1)-1), 2^(b-1)-1] with scale
            absmax/(2^(b-1)-1) (zero-centred, what dynamic int8 kernels compute at run time), or
            ``full`` [-2^(b-1), 2^(b-1)-1] with scale absmax/(2^(b-1)-0.5) (every code used —
            torchao's convention; int3 has 8 levels instead of 7). ``auto`` (the default) picks
            what measured better (``auto_range``); ``full_range`` says which one a spec uses.
    """

    dtype: str = "int8"
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "fp32"
    convention: str = "default"
    ste: str = "plain"
    learn_scale: bool = False
    scale_init: str = "minmax"
    range: str = "auto"

    def __post_init__(self) -> None:
        _choose("quant dtype", self.dtype, DTYPES)
        _choose("granularity", self.granularity, GRANULARITIES)
        _choose("convention", self.convention, CONVENTIONS)
        _choose("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _choose("ste", self.ste, STES)
        _choose("scale_init", self.scale_init, SCALE_INITS)
        _choose("range", self.range, RANGES)
        if self.range == "full" and not (
            self.dtype in INT_BITS and self.symmetric and self.convention == "default"
        ):
            raise ValueError(
                "range 'full' is for symmetric integer grids of the default convention (asymmetric grids and "
                f"file formats fix their own range); got {self.dtype}, symmetric={self.symmetric}, "
                f"convention {self.convention}"
            )
        if self.granularity == "group":
            if self.group_size is None or self.group_size < 1:
                raise ValueError("granularity 'group' needs a positive group_size (e.g. 32, 64, 128)")
        elif self.group_size is not None:
            raise ValueError(
                f"group_size is only meaningful with granularity 'group', not {self.granularity!r}"
            )
        if not self.symmetric and self.dtype not in INT_BITS:
            raise ValueError(
                f"{self.dtype} is a symmetric format: asymmetric (zero-point) {self.dtype} does not exist"
            )
        if self.dtype == "nf4" and self.granularity != "group":
            raise ValueError(
                "nf4 uses block-wise absmax scales: set granularity 'group' (QLoRA uses group_size 64)"
            )
        if self.learn_scale and self.dtype not in INT_BITS:
            raise ValueError(f"learned scales (LSQ) are for integer grids, not {self.dtype}")
        if self.learn_scale and self.granularity == "token":
            raise ValueError(
                "per-token scales are computed on the fly for each input: they cannot be learned"
            )
        if self.learn_scale and self.convention != "default":
            raise ValueError(
                f"a learned scale would leave the {self.convention} grid; use convention 'default'"
            )
        expected = CONVENTION_SHAPES.get(self.convention)
        if expected is not None:
            actual = (self.dtype, self.granularity, self.group_size, self.symmetric)
            if actual != expected:
                raise ValueError(
                    f"convention {self.convention} is {expected[0]}, granularity {expected[1]}, group_size "
                    f"{expected[2]}, symmetric={expected[3]}; got {actual}"
                )

    @property
    def full_range(self) -> bool:
        """Whether the codes span the full signed range (``range: full``, or ``auto`` where it picks it)."""
        if self.range == "auto":
            return auto_range(self) == "full"
        return self.range == "full"

    @property
    def bits(self) -> float:
        """Bits per element of the codes (ternary: log2(3) ≈ 1.58)."""
        if self.dtype in INT_BITS:
            return INT_BITS[self.dtype]
        return {"fp8_e4m3": 8, "fp8_e5m2": 8, "nf4": 4, "ternary": 1.58}[self.dtype]

    @property
    def bits_per_weight(self) -> float:
        """Code bits plus the amortised scale (and zero point) bits of a group."""
        if self.granularity != "group":
            return float(self.bits)
        scale_bits = 32 if self.scale_dtype == "fp32" else 16
        extra = scale_bits + (0 if self.symmetric else (16 if self.convention == "gguf_q4_1" else self.bits))
        return self.bits + extra / self.group_size

    def forward_fields(self) -> tuple:
        """What this spec computes, not how it trains (the STE, how learned scales start): two
        specs with equal fields round a tensor alike — what a format's runtime is compared against."""
        return (self.dtype, self.granularity, self.group_size, self.symmetric, self.scale_dtype,
                self.convention, self.full_range, self.learn_scale)  # fmt: skip

    def describe(self) -> str:
        """``int4 g32 sym``-style short name for tables."""
        shape = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        kind = "sym" if self.symmetric else "asym"
        extra = (" full" if self.full_range else "") + (" lsq" if self.learn_scale else "")
        return f"{self.dtype} {shape} {kind}{extra}" if self.convention == "default" else self.convention

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, value: str | dict[str, Any] | QuantSpec, role: str = "weight") -> QuantSpec:
        """A spec from a preset name, a dict of fields (optionally ``preset:`` plus overrides)."""
        if isinstance(value, QuantSpec):
            return value
        if isinstance(value, str):
            return cls.preset(value, role)
        values = dict(value)
        known = {f.name for f in fields(cls)}
        base = cls.preset(values.pop("preset"), role) if "preset" in values else None
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" Did you mean: {close[0]!r}?" if close else ""
                raise ValueError(f"QuantSpec has no field {key!r}.{hint} Fields: {', '.join(sorted(known))}")
        return replace(base, **values) if base is not None else cls(**values)

    @classmethod
    def preset(cls, name: str, role: str = "weight") -> QuantSpec:
        """A named preset; ``role`` picks the weight or activation half of a scheme like ``w4a8``."""
        _choose("preset", name, tuple(PRESETS))
        _choose("preset role", role, ("weight", "activation"))
        spec = PRESETS[name].get(role)
        if spec is None:
            raise ValueError(f"preset {name!r} has no {role} quantization")
        return spec


# The exact shape each file-format convention requires.
CONVENTION_SHAPES = {
    "gguf_q8_0": ("int8", "group", 32, True),
    "gguf_q4_0": ("int4", "group", 32, True),
    "gguf_q4_1": ("int4", "group", 32, False),
}

_INT8_TOKEN = QuantSpec(dtype="int8", granularity="token")
_Q8_0 = QuantSpec("int8", "group", 32, True, "fp16", "gguf_q8_0")

PRESETS: dict[str, dict[str, QuantSpec]] = {
    # llama.cpp block formats: blocks of 32 along a row, fp16 scales, llama.cpp's rounding.
    # As an activation (``activation: gguf_q8_0``): what llama.cpp's CPU matmuls do to the input of
    # every Q8_0/Q4_0/Q4_1 weight at run time (Q4_1's Q8_1 blocks hold the same codes and scales and
    # a block sum), so QAT trains on the rounding the deployed model computes.
    "gguf_q8_0": {"weight": _Q8_0, "activation": _Q8_0},
    "gguf_q4_0": {"weight": QuantSpec("int4", "group", 32, True, "fp16", "gguf_q4_0")},
    "gguf_q4_1": {"weight": QuantSpec("int4", "group", 32, False, "fp16", "gguf_q4_1")},
    # Weight-and-activation schemes.
    "w4a8": {"weight": QuantSpec("int4", "group", 32), "activation": _INT8_TOKEN},
    "w8a8": {"weight": QuantSpec("int8", "channel"), "activation": _INT8_TOKEN},
    "w4a16": {"weight": QuantSpec("int4", "group", 128)},
    "fp8": {
        "weight": QuantSpec("fp8_e4m3", "channel"),
        "activation": QuantSpec("fp8_e4m3", "token"),
    },
    # QLoRA's NormalFloat4, bitsandbytes' layout.
    "nf4": {"weight": QuantSpec("nf4", "group", 64)},
    # llama.cpp's ternary TQ1_0/TQ2_0: absmean ternary weights with an fp16 scale (what the blocks store).
    "gguf_ternary": {"weight": QuantSpec("ternary", "tensor", scale_dtype="fp16")},
    # BitNet b1.58: absmean ternary weights, per-token absmax int8 activations.
    "bitnet": {"weight": QuantSpec("ternary", "tensor"), "activation": _INT8_TOKEN},
}
