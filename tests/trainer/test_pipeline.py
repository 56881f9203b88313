"""The model-transform pipeline, torch.compile per layer, and stopping on a signal with a checkpoint."""

from __future__ import annotations

import json

import pytest

from lowbit.quant import FakeQuantLinear
from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.hooks import StepHook
from lowbit.trainer.loop import Trainer
from lowbit.trainer.preemption import Preempted
from lowbit.trainer.transforms import TRANSFORMS, TransformResult, apply_transforms, register_transform
from tests.conftest import TINY, run_cli, tiny_overrides
from tests.distributed.test_faults import HOOKS

W4A8 = 'quant={rules: [{match: "*", weight: w4a8, activation: w4a8}]}'


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_transforms_run_in_their_registered_order_on_the_unwrapped_model(tiny_config):
    seen = []

    @register_transform("test_before_quant", order=10, enabled=lambda cfg: True)
    def before(model, cfg):
        seen.append(("before", any(isinstance(m, FakeQuantLinear) for m in model.modules())))
        return TransformResult("before")

    @register_transform("test_after_quant", order=30, enabled=lambda cfg: True)
    def after(model, cfg):
        seen.append(("after", any(isinstance(m, FakeQuantLinear) for m in model.modules())))
        return TransformResult("after")

    try:
        trainer = Trainer(tiny_config(W4A8, "train.max_steps=2", "train.warmup_steps=0"))
        trainer.close()
    finally:
        del TRANSFORMS["test_before_quant"], TRANSFORMS["test_after_quant"]
    assert seen == [("before", False), ("after", True)]
    assert [t.name for t in sorted(TRANSFORMS.values(), key=lambda t: t.order)] == [
        "subln",
        "quant",
        "init_from",
        "lora",
        "compile",
    ]


def test_a_transform_adds_its_hooks_and_a_disabled_one_does_nothing(tiny_config):
    from lowbit.trainer.model import load_model
    from lowbit.trainer.quantization import QuantSchedule

    cfg = tiny_config(W4A8)
    model = load_model(cfg.model, None, seed=0, vocab_needed=262)
    result = apply_transforms(model, cfg, announce=False)
    assert [type(hook) for hook in result.hooks] == [QuantSchedule] and not result.unused_parameters
    assert isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    plain = load_model(cfg.model, None, seed=0, vocab_needed=262)
    assert apply_transforms(plain, tiny_config(), announce=False).hooks == []
    assert not any(isinstance(m, FakeQuantLinear) for m in plain.modules())
    # learned scales get no gradient while a warm-up's λ = 0 returns the float input: DDP must know
    lsq = 'quant={rules: [{match: "*", weight: {dtype: int4, granularity: group, group_size: 32, learn_scale: true}}]}'
    for warmup, unused in (("quant.warmup.steps=0", False), ("quant.warmup.steps=2", True)):
        model = load_model(cfg.model, None, seed=0, vocab_needed=262)
        assert apply_transforms(model, tiny_config(lsq, warmup), announce=False).unused_parameters is unused


def test_compiled_layers_train_as_the_eager_model_does(tiny_config, tmp_path):
    """train.compile compiles each decoder layer (Inductor, C++ on CPU); QAT included."""
    common = [W4A8, "train.max_steps=3", "train.warmup_steps=0", "eval.every_steps=0"]
    eager = Trainer(tiny_config(*common, run_dir=tmp_path / "eager"))
    eager.fit()
    eager.close()
    compiled = Trainer(tiny_config(*common, "train.compile=true", run_dir=tmp_path / "compiled"))
    layer = compiled.strategy.unwrap(compiled.parts.model).model.layers[0]
    assert layer._compiled_call_impl is not None  # compiled in place: names and parameters unchanged
    compiled.fit()
    compiled.close()
    # Inductor fuses and reorders fp32 arithmetic (a few ulps of each activation), and training
    # at lr 3e-3 amplifies that step by step: measured here 5e-7, 1e-5, 3.4e-5 on the losses
    # (~5.5) of steps 1-3, so 1e-4 bounds 3 steps with a 3x margin.
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"))) < 1e-4


@pytest.mark.parametrize(("name", "code"), [("TERM", 143), ("INT", 130)])
def test_a_stop_signal_ends_after_the_step_with_a_checkpoint_of_it(tmp_path, name, code):
    hooks = [f"imports=[{HOOKS}]", f"hooks=[{{kind: signal_at_step, step: 3, signal: {name}}}]"]
    done = run_cli(
        "train", str(TINY), *tiny_overrides(tmp_path, "train.max_steps=8", "checkpoint.every_steps=5", *hooks)
    )
    assert done.returncode == code, done.stderr[-3000:]
    assert (
        f"stopped by SIG{name} after step 3, with a checkpoint of that step; relaunch the same command"
        in done.stderr
    )
    newest = ckpt.complete_checkpoints(tmp_path)[0]
    assert ckpt.checkpoint_step(newest) == 3 and ckpt.verify(newest) is None
    again = run_cli(
        "train", str(TINY), *tiny_overrides(tmp_path, "train.max_steps=8", "checkpoint.every_steps=5")
    )
    assert again.returncode == 0 and "checkpoint-000003 at step 3" in again.stderr


def test_preempted_is_raised_by_fit_for_callers_in_python(tiny_config):
    import os
    import signal

    trainer = Trainer(tiny_config("train.max_steps=6", "train.warmup_steps=0", "eval.every_steps=0"))

    class Usr1AtTwo(StepHook):
        def on_step_end(self, trainer, step, metrics):
            if step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer.parts.hooks.append(Usr1AtTwo())
    with pytest.raises(Preempted) as stop:
        trainer.fit()
    trainer.close()
    assert stop.value.step == 2 and stop.value.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


def test_a_second_ctrl_c_aborts_at_once():
    import os
    import signal

    from lowbit.trainer.preemption import StopSignals

    # the handler the process had (a background launch inherits SIG_IGN for SIGINT): restored after
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT  # the first only asks for a stop at the step's end
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
