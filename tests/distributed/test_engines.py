"""Every engine runs every method: 2 gloo processes give the 1-process losses at equal global batch,
sharding really shards, and fake quant uses the current weights under sharding."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.conftest import (
    ENGINE_NAMES,
    EXTRA_RUNS,
    METHOD_NAMES,
    PROBES,
    SKIPPED,
    losses,
    torchrun,
)

pytestmark = pytest.mark.distributed

# Per-step losses of the 2-process run vs the 1-process run (global batch 8: 4 × 2 accumulation
# in one process, 2 × 2 × 2 in two). The two differ only in the order fp32 gradients are summed
# (within a rank, then across ranks by the engine's all-reduce / reduce-scatter), a few ulps of
# each gradient; after 6 AdamW steps at lr 3e-3 that moves a loss of ~5 by a few 1e-6 (the
# largest difference seen is written to the closing note of each session that changes engines).
# The bound 1e-5 leaves room for that and still fails on any real error
# (a wrong token count, a missed reduction, a stale weight: >= 1e-3). QAT gets 1e-4: a weight that
# an ulp moves across a rounding boundary of the 3/4-bit grid changes by a whole grid step.
TOLERANCE = {"plain": 1e-5, "masked": 1e-5, "kd": 1e-5, "kd_relation": 1e-5, "kd_topk_cache": 1e-5,
             "masked_fused_kd": 1e-5, "qat_w4a8": 1e-4, "qat_lsq_int3": 1e-4, "qat_schedule": 1e-4,
             "qad": 1e-4, "qlora": 1e-5, "qlora_kd": 1e-5, "qpissa": 1e-5, "bitnet_distill": 5e-4}  # fmt: skip
# BitNet: a latent weight an ulp moves across ±scale/2 flips its ternary code by a whole scale
# (~mean |W|), not by a grid step of 1/7 or 1/15 of the range; ZeRO-3's fp32 master update differs
# from torch's AdamW in ulps, and such a flip moved its loss by 1.7e-4 at step 4 (fsdp2 and ddp:
# ≤ 9e-6). That the forwards use the right ternary weights is checked exactly, below.


@pytest.mark.parametrize(
    ("engine", "method"), [(e, m) for e in ENGINE_NAMES for m in METHOD_NAMES if (e, m) not in SKIPPED]
)
def test_two_processes_give_the_one_process_losses(engine_runs, engine, method):
    one, two = losses(engine_runs / "single" / method), losses(engine_runs / engine / method)
    assert len(one) == len(two) == 6
    worst = max(abs(a - b) for a, b in zip(one, two))
    assert worst < TOLERANCE[method], (engine, method, one, two)
    assert one[-1] < one[0]  # it trains


@pytest.mark.parametrize(("engine", "method", "reference"), [*EXTRA_RUNS, ("hsdp", "plain", "plain")])
def test_engine_options_sharded_teachers_and_teacher_caches_give_the_one_process_losses(
    engine_runs, engine, method, reference
):
    """Activation checkpointing under FSDP2; ZeRO-3 with optimizer and parameters offloaded;
    HSDP (4 ranks: 2 replicas × 2 shards); a teacher sharded for inference (vs the replicated
    teacher of one process); the fused head over ranks that count different numbers of tokens
    (ZeRO-3 gathers the head in every chunk, so the ranks must run as many chunks); the offline
    teacher cache."""
    one, two = losses(engine_runs / "single" / reference), losses(engine_runs / engine / method)
    assert len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE[reference], (engine, method, one, two)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_checkpoint_readers_give_the_weights_the_live_engine_consolidates(engine_runs, engine):
    """What eval and export read from a (sharded) checkpoint in one process equals what the
    running engine gathered itself at the end of training (FSDP2: DCP full state dict; ZeRO-3:
    DeepSpeed's layer-by-layer gather): two independent reassemblies, bit for bit."""
    from safetensors.torch import load_file

    from tests.distributed.test_faults import final_weights

    run_dir = engine_runs / engine / "qat_w4a8"
    live = load_file(run_dir / "consolidated.safetensors")
    read = final_weights(run_dir)
    assert set(live) <= set(read) and len(live) >= len(read) - 1  # DeepSpeed lists a tied head once
    assert all(torch.equal(live[name], read[name]) for name in live)


@pytest.mark.parametrize(("engine", "method"), [*[(e, "qat_probe") for e in PROBES], ("fsdp2", "bitnet_distill"),
                                               ("zero3", "bitnet_distill")])  # fmt: skip
def test_each_forward_fake_quantizes_the_current_full_weight_after_every_step(engine_runs, engine, method):
    """Under sharding the gathered weight is refilled in place each step (same version, often the
    same memory): the cache keyed on (_version, data_ptr) that lowbit had served the previous
    step's weights whenever the allocator handed back the same memory (with it restored, this check
    counted 1 stale forward under fsdp2 without resharding and 2 under ZeRO-3, in 6 steps; whether
    the memory is reused varies from run to run). Per step: training forwards
    whose weight differs from fake_quant(current full weight). The BitNet runs check that per-tensor
    absmean scales come from the whole weight (warm-up blend included), not from a shard."""
    mismatches = (engine_runs / engine / method / "forward_weights.txt").read_text().split()
    assert mismatches == ["0"] * 6


# Per-rank bytes of parameters + gradients + optimizer state (AdamW: 2 states), fp32 (4 bytes),
# Ψ parameters, N = 2 ranks, counted just before an optimizer step. DeepSpeed keeps an fp32
# master copy of its partition beside the model's own (fp32) parameters; FSDP2 steps the fp32
# shards themselves.
FORMULAS = {
    "ddp": lambda p, n: 16 * p,  # params 4Ψ + grads 4Ψ + Adam 8Ψ
    "fsdp2": lambda p, n: 16 * p / n,  # all of it sharded
    "zero1": lambda p, n: 8 * p + 12 * p / n,  # params + grads whole; master + Adam sharded
    "zero2": lambda p, n: 4 * p + 16 * p / n,  # params whole; grads, master, Adam sharded
    "zero3": lambda p, n: 20 * p / n,  # params, master, grads, Adam sharded
}


def test_each_engine_holds_the_bytes_its_formula_says(tmp_path):
    done = torchrun("tests.distributed.engine_runner", "memory", str(tmp_path), *FORMULAS)
    assert done.returncode == 0, done.stderr[-6000:]
    results = json.loads((tmp_path / "memory.json").read_text())
    for engine, formula in FORMULAS.items():
        params, counted = results[engine]["params"], results[engine]["bytes"]
        assert params > 19_000_000  # a model of a few tens of millions of parameters
        expected = formula(params, 2)
        assert abs(counted - expected) <= 0.10 * expected, (engine, counted / expected)
    assert results["zero3"]["bytes"] < 0.7 * results["ddp"]["bytes"]


def test_fsdp2_shards_the_4bit_base_and_gathers_nan_looking_bytes_bit_for_bit(tmp_path):
    """A 4-bit layer sharded over 2 ranks with a bf16 mixed-precision policy: each rank holds half
    of every state tensor (codes, absmax; the 7-entry second level splits 4 + 3), the all-gather
    returns the planted codes — every byte pair that reads as a non-canonical bf16 NaN — and the
    float32 statistics unchanged (integers are never cast), and the sharded forward equals the
    unsharded layer's bit for bit."""
    result_file = tmp_path / "nf4.json"
    result = torchrun("tests.distributed.nf4_sharding", str(result_file))
    assert result.returncode == 0, result.stderr[-4000:]
    result = json.loads(result_file.read_text())
    for name, whole in result["whole"].items():
        shares = [share[name] for share in result["shares"]]
        assert sum(shares) == whole and max(shares) == -(-whole // 2), (name, shares)
    assert all(result["gathered_equal"].values()) and len(result["gathered_equal"]) == 4
    assert (
        result["gathered_dtypes"]["packed"] == "torch.uint8"
        and result["gathered_dtypes"]["absmax"] == "torch.uint8"
    )
    assert result["forward_max_diff"] == 0.0


@pytest.mark.parametrize("engine", ["fsdp2", "zero3", "ddp"])
def test_the_4bit_base_is_split_over_the_ranks_by_the_sharding_engines(engine_runs, engine):
    """Counted from the tensors each rank holds in a QLoRA run: FSDP2 and ZeRO-3 keep 1/2 of the
    NF4 codes and block statistics per rank (up to one padding element per tensor), DDP all of it."""
    shares = [
        json.loads((engine_runs / engine / "qlora" / f"base_shares-rank{r}.json").read_text()) for r in (0, 1)
    ]
    whole = shares[0]["whole"]
    assert whole > 0 and shares[1]["whole"] == whole
    tensors = 2 * 14  # packed + absmax of 14 layers
    for share in shares:
        if engine == "ddp":
            assert share["local"] == whole
        else:
            assert abs(share["local"] - whole / 2) <= tensors, (engine, shares)


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_adapter_only_checkpoints_of_sharding_engines_export_the_live_adapters(engine_runs, engine, tmp_path):
    """A QLoRA checkpoint of a sharded engine holds only what trains (DCP without the frozen base;
    DeepSpeed with its frozen parameters excluded). ``lowbit export --format peft`` rebuilds the base
    from the model source, reads the adapters back from those files in one process, and writes what
    the live engine held at the end of training, bit for bit."""
    from safetensors.torch import load_file

    from lowbit.trainer.export import export

    run_dir = engine_runs / engine / "qlora"
    live = load_file(run_dir / "consolidated.safetensors")
    export(run_dir, "peft", tmp_path / "adapter")
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(written) == 28  # A and B of 14 layers
    for name, tensor in written.items():
        ours = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(tensor, live[ours]), name
