"""Activations of a model on a few prompts: the inputs of every linear layer, for GPTQ's Hessians
and for the benchmark's output-space error.

This loads the whole model once through transformers (the one place the compressor does): it is
opt-in (`gptq_prompts` > 0), and its memory is the model's size on top of the streaming compressor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

PROMPTS = (
    "What is the capital of France? Answer in one word.",
    "Write a JSON object with the keys name and age for a 30 year old called Ada.",
    "Compute 17 + 25 and explain the steps.",
    "Summarise in one sentence: the cat sat on the mat because the sun warmed it.",
    "Translate 'good morning' into Spanish and German.",
    "List three prime numbers greater than 50.",
    "Give a short title for a story about a lighthouse keeper.",
    "Reply with yes or no: is 2024-02-30 a valid date?",
)
EMBEDDING = "model.embed_tokens.weight"
Hook = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]
"""A forward hook: (module, its positional inputs, its output)."""


def capture_inputs(model_dir: Path | str, prompts: tuple[str, ...] | list[str] = PROMPTS) -> dict[str, torch.Tensor]:
    """{"<linear name>.weight": inputs [T, in] float32} over the chat-formatted prompts, plus
    {EMBEDDING: token ids [T] int64}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train(False)  # what eval() does; transformers declares its eval() without types
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Hook:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).detach())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ids = []
    with torch.no_grad():
        for prompt in prompts:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            batch = tok(text, return_tensors="pt")
            ids.append(batch["input_ids"][0])
            model(**batch)
    for handle in handles:
        handle.remove()
    out = {f"{name}.weight": torch.cat(xs) for name, xs in seen.items()}
    out[EMBEDDING] = torch.cat(ids)
    return out
