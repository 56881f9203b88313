"""A frozen 4-bit (NF4 / FP4) linear base for QLoRA that FSDP2 and ZeRO-3 shard for real.

Codes, block absmax and double quantization are bitsandbytes' own: ``quantize_4bit`` makes them
and ``dequantize_4bit`` (bitsandbytes' CUDA kernel on GPUs, its CPU op elsewhere) turns them back
into a weight, so the base a run trains on is bit for bit the one ``BitsAndBytesConfig(load_in_4bit)``
loads, and an exported adapter fits it.

Why not ``bnb.nn.Linear4bit``: its ``Params4bit`` keeps the quantization state as a Python attribute
of the parameter, which FSDP2 sharding drops (bitsandbytes#1424), and its bf16 storage option puts
packed bytes inside bf16 numbers that FSDP2 canonicalises when they look like NaN (bitsandbytes#1945);
accelerate's fix leaves the 4-bit weights out of sharding. Here every piece of the state is a plain
frozen *integer* ``nn.Parameter``, flat in bitsandbytes' layout: the packed codes ``uint8``, and the
float32 statistics (block absmax, or with double quantization its second level and offset) stored
as their ``int32`` bit patterns, viewed back as float32 where they are read. FSDP2 shards each along
its only dimension and all-gathers it bit for bit: it casts only floating-point parameters to its
mixed-precision dtype (a bf16 absmax would no longer be bitsandbytes' scale) and copies groups of
mixed dtypes as bytes; ``model.to(torch.bfloat16)`` and DeepSpeed's bf16 leave integers alone too.
ZeRO-3 partitions them and DCP checkpoints them. Nothing needs a tensor subclass (torchao's
``NF4Tensor`` route): the module's forward sees the gathered flat tensors and rebuilds the
``QuantState`` around them.

Backward never keeps a dequantized weight: ``_DequantizedLinear`` saves the packed tensors and
dequantizes again for the input gradient, so activations are the only per-layer memory that grows
with the batch (as bitsandbytes' ``MatMul4Bit``). The weight gets no gradient: the base is frozen.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bitsandbytes' block for double-quantizing the absmax


@functools.cache
def _code_table(kind: str, device: torch.device) -> Tensor:
    """bitsandbytes' value tables (the 16 NF4/FP4 values; the 256-entry dynamic map of double
    quantization), built once per device: building them costs more than dequantizing a small layer."""
    import bitsandbytes.functional as bnbf

    if kind == "dynamic":
        return bnbf.create_dynamic_map(signed=True).to(device)
    return bnbf.get_4bit_type(kind, device=device)


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _bits(values: Tensor) -> Tensor:
    """float32 values as their int32 bit patterns (what the parameters store)."""
    return values.float().contiguous().view(torch.int32)


def _floats(bits: Tensor) -> Tensor:
    """int32 bit patterns back to the float32 values (a view: no copy)."""
    return bits.view(torch.float32)


class _DequantizedLinear(torch.autograd.Function):
    """``x @ dequantize(state).T`` that saves the packed state, not the weight, for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, module: FrozenNF4Linear, *state: Tensor) -> Tensor:
        dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        ctx.module, ctx.input_dtype, ctx.compute_dtype = module, x.dtype, dtype
        ctx.save_for_backward(*state)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), module.dequantize(*state).to(dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        state = ctx.saved_tensors  # read once: activation checkpointing unpacks saved tensors only once
        weight = ctx.module.dequantize(*state).to(ctx.compute_dtype)
        grad_input = grad.to(ctx.compute_dtype) @ weight
        return (grad_input.to(ctx.input_dtype), None, *[None] * len(state))


class FrozenNF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored as bitsandbytes 4-bit codes.

    It subclasses ``nn.Linear`` so that LoRA (peft's ``lora.Linear``) wraps it as it wraps any
    linear; ``weight`` is the dequantized weight, read-only (for LoRA initialisation, DoRA norms,
    merges), never a parameter. Parameters: ``packed`` (uint8, ``ceil(numel / 2)`` codes two per byte,
    bitsandbytes' flat layout), ``absmax`` (one per block of ``blocksize`` elements of the row-major
    weight: float32 bits as int32, or uint8 codes with ``double_quant``), with double quantization
    also ``nested_absmax`` (one per 256 blocks) and ``offset`` (1), both float32 bits as int32, and
    ``bias`` (float) if any.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"4-bit base: quant type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(
                f"4-bit base: block size {blocksize}; bitsandbytes accepts {', '.join(map(str, BLOCKSIZES))}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        numel = in_features * out_features
        blocks = -(-numel // blocksize)
        self.packed = _frozen(torch.zeros((numel + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.absmax = _frozen(torch.zeros(blocks, dtype=torch.uint8, device=device))
            nested = -(-blocks // NESTED_BLOCKSIZE)
            self.nested_absmax = _frozen(torch.zeros(nested, dtype=torch.int32, device=device))
            self.offset = _frozen(torch.zeros(1, dtype=torch.int32, device=device))
        else:
            self.absmax = _frozen(torch.zeros(blocks, dtype=torch.int32, device=device))
        self.bias = _frozen(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> FrozenNF4Linear:
        """Quantize ``linear``'s weight with bitsandbytes (a meta-device linear gives the shapes only)."""
        import bitsandbytes.functional as bnbf

        weight = linear.weight
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, quant_type, blocksize,
            double_quant, compute_dtype or weight.dtype, device=weight.device,
        )  # fmt: skip
        if weight.is_meta:
            return module
        with torch.no_grad():
            packed, state = bnbf.quantize_4bit(
                weight.detach(), blocksize=blocksize, quant_type=quant_type,
                compress_statistics=double_quant, quant_storage=torch.uint8,
            )  # fmt: skip
            module.packed.copy_(packed.reshape(-1))
            if double_quant:
                module.absmax.copy_(state.absmax.reshape(-1))
                module.nested_absmax.copy_(_bits(state.state2.absmax.reshape(-1)))
                module.offset.copy_(_bits(state.offset.reshape(1)))
            else:
                module.absmax.copy_(_bits(state.absmax.reshape(-1)))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def state_tensors(self) -> tuple[Tensor, ...]:
        """The tensors ``dequantize`` reads (the gathered ones while a sharded forward runs)."""
        if self.double_quant:
            return (self.packed, self.absmax, self.nested_absmax, self.offset)
        return (self.packed, self.absmax)

    def quant_state(
        self,
        absmax: Tensor,
        nested_absmax: Tensor | None = None,
        offset: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ):
        """bitsandbytes' ``QuantState`` around these tensors; dequantization produces ``dtype``
        (default ``compute_dtype``)."""
        import bitsandbytes.functional as bnbf

        device = absmax.device
        state2 = None
        if self.double_quant:
            assert nested_absmax is not None and offset is not None
            state2 = bnbf.QuantState(
                absmax=_floats(nested_absmax),
                code=_code_table("dynamic", device),
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            offset = _floats(offset).reshape(())
        else:
            absmax = _floats(absmax)
        return bnbf.QuantState(
            absmax=absmax, shape=torch.Size((self.out_features, self.in_features)),
            code=_code_table(self.quant_type, device), blocksize=self.blocksize,
            quant_type=self.quant_type, dtype=dtype or self.compute_dtype, offset=offset, state2=state2,
        )  # fmt: skip

    def dequantize(self, *state: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The ``[out, in]`` weight in ``dtype`` (default ``compute_dtype``), from ``state`` (default:
        this module's)."""
        import bitsandbytes.functional as bnbf

        packed, *stats = state or self.state_tensors()
        return bnbf.dequantize_4bit(packed.reshape(-1, 1), self.quant_state(*stats, dtype=dtype))

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A float ``nn.Linear`` holding the dequantized weight (in ``dtype``: fp32 for merges)."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=self.packed.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(dtype=dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The dequantized weight (read-only: the 4-bit base is frozen)."""
        return self.dequantize()

    @weight.setter
    def weight(self, value) -> None:
        raise AttributeError(
            "the weight of a 4-bit base layer is frozen codes: merge adapters with `lowbit export --format merged`"
        )

    @property
    def logical_parameters(self) -> int:
        """Weights (and bias) this layer stands for, as a float layer would count them."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def forward(self, x: Tensor) -> Tensor:
        out = _DequantizedLinear.apply(x, self, *self.state_tensors())
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen 4-bit base's state (codes and statistics, bias included)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for module in model.modules()
        if isinstance(module, FrozenNF4Linear)
        for tensor in module.parameters(recurse=False)
    )


__all__ = ["BLOCKSIZES", "QUANT_TYPES", "FrozenNF4Linear", "base_bytes"]
