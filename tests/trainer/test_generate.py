"""`lowbit generate`: the completions are the fake-quant model's own greedy (or seeded) decode."""

from __future__ import annotations

import pytest
import torch

from lowbit.trainer.cli import main
from lowbit.trainer.config import load_config
from lowbit.trainer.errors import UserError
from lowbit.trainer.export import load_source
from lowbit.trainer.generate_cli import generate
from lowbit.trainer.loop import train
from lowbit.trainer.quantization import quantizers_enabled
from tests.conftest import TINY, tiny_overrides

W4A8 = "quant={rules: [{match: '*', weight: w4a8, activation: w4a8}], baselines: false}"


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    train(load_config(TINY, tiny_overrides(run_dir, "train.max_steps=20", "eval.every_steps=0", W4A8)))
    return run_dir


def test_greedy_completion_is_the_fake_quant_models_argmax_decode(qat_run):
    prompt = "Fellow-Citizens of the Senate"
    completion = generate(qat_run, [prompt], max_new_tokens=8)[0]
    loaded = load_source(qat_run, [])
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), quantizers_enabled(model, True):  # as deployed: fake quant on
        for _ in range(8):  # the textbook loop: full forward, argmax of the last position
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tokenizer.decode(ids[0, -8:], skip_special_tokens=True)
    assert completion.new_tokens == 8 and completion.text == expected


def test_sampling_is_reproducible_by_seed_and_the_cli_prints_each_prompt(qat_run, capsys):
    a, b = (generate(qat_run, ["The"], max_new_tokens=12, temperature=1.0, seed=3)[0] for _ in range(2))
    assert a.text == b.text
    assert (
        main(["generate", str(qat_run), "--prompt", "The", "--prompt", "War", "--max-new-tokens", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "--- 'The' (+4 tokens)" in out and "--- 'War' (+4 tokens)" in out


def test_generate_refuses_what_it_cannot_do(qat_run):
    with pytest.raises(UserError, match="prompt '' encodes to no tokens"):
        generate(qat_run, [""])
    with pytest.raises(UserError, match="--max-new-tokens must be at least 1"):
        generate(qat_run, ["hi"], max_new_tokens=0)
