"""``lowbit generate``: a few completions from a run, a checkpoint, a GGUF or a HF model — the
sanity check after training, with fake quant on (the model as it will be deployed).

The model is loaded exactly as ``lowbit export`` loads it (``export.load_source``: the recipe's
transforms, then the checkpoint's weights), and decoded with transformers' ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.trainer.errors import UserError


@dataclass
class Completion:
    prompt: str
    text: str  # the generated continuation only
    new_tokens: int


def generate(
    source: Path,
    prompts: list[str],
    overrides: list[str] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
) -> list[Completion]:
    """Greedy (``temperature`` 0) or sampled completions of each prompt, one at a time."""
    from lowbit.trainer.export import load_source

    if not prompts:
        raise UserError("give at least one --prompt")
    if max_new_tokens < 1 or temperature < 0:
        raise UserError("--max-new-tokens must be at least 1 and --temperature at least 0")
    loaded = load_source(source, overrides or [], merge=False)  # a LoRA run generates as it trained
    model, tokenizer = loaded.model, loaded.tokenizer
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{source}: its tokenizer has no chat template; drop --chat to complete raw text")
    completions = []
    for prompt in prompts:
        torch.manual_seed(seed)
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                return_dict=True,
            )["input_ids"]  # fmt: skip
        else:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:
            raise UserError(f"prompt {prompt!r} encodes to no tokens")
        sampling = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, use_cache=True,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                **sampling,
            )  # fmt: skip
        new = out[0, ids.shape[1] :]
        completions.append(
            Completion(prompt, tokenizer.decode(new, skip_special_tokens=True), int(new.numel()))
        )
    return completions
