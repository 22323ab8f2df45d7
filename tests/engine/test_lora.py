"""LoRA tasks serve exactly: logits and greedy tokens equal peft's `merge_and_unload()` model, alone and in
one batch with ImPart tasks and the base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from compressor.lora import import_lora
from server.model.llama import LlamaModel
from tests.compressor.peft_adapters import RICH, peft_merged, write_adapter
from tests.engine.conftest import (
    assert_logprobs_match,
    greedy,
    hf_greedy,
    merged_hf,
    output_ids,
    random_prompts,
    run_rows,
)
from tests.engine.test_task_deltas import _mixed_prefill

MIXED = ("rich", None, "alpha", "plain", "rich", "beta", None)
"""Two LoRA tasks, two ImPart tasks and the base, one LoRA task twice."""
PLAIN = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}


@pytest.fixture(scope="module")
def lora_tasks(tiny_model: Path, tiny_tasks: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tasks folder with LoRA tasks "rich" (RICH) and "plain", and ImPart tasks "alpha", "beta";
    and each LoRA task's adapter folder."""
    root = tmp_path_factory.mktemp("lora-tasks")
    tasks = root / "tasks"
    tasks.mkdir()
    adapters = {
        "rich": write_adapter(tiny_model, root / "rich", seed=11, **RICH),
        "plain": write_adapter(tiny_model, root / "plain", seed=12, **PLAIN),
    }
    for name, adapter in adapters.items():
        import_lora(adapter, tiny_model, tasks / f"{name}.safetensors")
    for name in ("alpha", "beta"):
        shutil.copy(tiny_tasks / f"{name}.safetensors", tasks / f"{name}.safetensors")
    return tasks, adapters


def _reference(base: Path, tasks: Path, adapters: dict, task: str | None) -> torch.nn.Module:
    """peft's merged model for a LoRA task, the merged artifact for an ImPart task, else the base."""
    if task in adapters:
        return peft_merged(base, adapters[task])
    return merged_hf(base, tasks / f"{task}.safetensors" if task else None)


def test_mixed_batch_logits_equal_peft_merged_models(tiny_model: Path, lora_tasks: tuple[Path, dict]) -> None:
    tasks, adapters = lora_tasks
    model = LlamaModel.from_dir(tiny_model)
    prompts = random_prompts(len(MIXED), model.config.vocab_size)
    logits = _mixed_prefill(model, tasks, MIXED, prompts)
    start = 0
    for task, prompt in zip(MIXED, prompts):
        with torch.no_grad():
            expected = _reference(tiny_model, tasks, adapters, task)(torch.tensor([prompt])).logits[0]
        assert (logits[start : start + len(prompt)] - expected).abs().max() < 1e-4, task
        start += len(prompt)


def test_lora_tasks_change_the_output(tiny_model: Path, lora_tasks: tuple[Path, dict]) -> None:
    """Guards the tests here against adapters too small to matter."""
    model = LlamaModel.from_dir(tiny_model)
    prompt = random_prompts(1, model.config.vocab_size)[0]
    per_seq = _mixed_prefill(model, lora_tasks[0], (None, "rich", "plain"), [prompt] * 3).view(3, len(prompt), -1)
    assert (per_seq[1] - per_seq[0]).abs().max() > 0.1 and (per_seq[2] - per_seq[0]).abs().max() > 0.1


@pytest.mark.parametrize("row_tasks", [("rich",), MIXED], ids=["alone", "mixed"])
async def test_engine_greedy_equals_peft_merged(
    tiny_model: Path, lora_tasks: tuple[Path, dict], row_tasks: tuple[str | None, ...]
) -> None:
    tasks, adapters = lora_tasks
    prompts = random_prompts(len(row_tasks), 400)
    results = await run_rows(tiny_model, tasks, list(zip(row_tasks, prompts)), greedy(16, logprobs=0))
    for task, prompt, chunks in zip(row_tasks, prompts, results):
        tokens, logits = hf_greedy(_reference(tiny_model, tasks, adapters, task), prompt, 16)
        assert output_ids(chunks) == tokens, task
        assert_logprobs_match(chunks, tokens, logits, task)


@pytest.mark.slow
def test_smollm2_adapter_logits_equal_peft_merged(smollm2_dir: Path, tmp_path: Path) -> None:
    """A rank-16 adapter on every projection of SmolLM2 (rank_pattern, rslora), alone and beside the base."""
    config = {
        "r": 16,
        "lora_alpha": 32,
        "use_rslora": True,
        "rank_pattern": {"down_proj": 8},
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    adapter = write_adapter(smollm2_dir, tmp_path / "ad", seed=5, scale=0.01, **config)
    tasks = tmp_path / "tasks"
    import_lora(adapter, smollm2_dir, tasks / "smol.safetensors")
    model = LlamaModel.from_dir(smollm2_dir)
    prompts = random_prompts(2, model.config.vocab_size)
    logits = _mixed_prefill(model, tasks, ("smol", None), prompts)
    with torch.no_grad():
        expected = peft_merged(smollm2_dir, adapter)(torch.tensor([prompts[0]])).logits[0]
        base = merged_hf(smollm2_dir, None)(torch.tensor([prompts[1]])).logits[0]
    assert (logits[: len(prompts[0])] - expected).abs().max() < 1e-4  # measured 6.4e-5 (logits up to 23)
    # The base row has no delta: its gap is the engine's own float32 order against transformers on random
    # tokens over 30 layers (measured 1.6e-4), not the adapter's; it only shows the batch leaves it alone.
    assert (logits[len(prompts[0]) :] - base).abs().max() < 1e-3
    assert (expected - merged_hf(smollm2_dir, None)(torch.tensor([prompts[0]])).logits[0]).abs().max() > 0.1


def test_tied_base_with_embedding_lora_equals_peft_merged(tiny_tied_model: Path, tmp_path: Path) -> None:
    """On a tied base the embedding's LoRA delta is the LM head's too, as in peft's merged model."""
    adapter = write_adapter(
        tiny_tied_model,
        tmp_path / "ad",
        seed=13,
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "gate_proj"],
    )
    tasks = tmp_path / "tasks"
    import_lora(adapter, tiny_tied_model, tasks / "tied.safetensors")
    model = LlamaModel.from_dir(tiny_tied_model)
    prompts = random_prompts(2, model.config.vocab_size)
    logits = _mixed_prefill(model, tasks, ("tied", None), prompts)
    with torch.no_grad():
        expected = peft_merged(tiny_tied_model, adapter)(torch.tensor([prompts[0]])).logits[0]
        base = merged_hf(tiny_tied_model, None)(torch.tensor([prompts[1]])).logits[0]
    assert (logits[: len(prompts[0])] - expected).abs().max() < 1e-4
    assert (logits[len(prompts[0]) :] - base).abs().max() < 1e-4
