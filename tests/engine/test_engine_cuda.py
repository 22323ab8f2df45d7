"""The engine on CUDA equals transformers' merged model on CUDA: greedy tokens of the base and of a task,
alone and in one mixed batch, float32, on the tiny model and tasks of tests/engine/conftest.py.

The same comparison as test_task_deltas' CPU test with only the device changed; skipped without CUDA
(bench/gpu_check.sh runs it on the GPU machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.conftest import (
    greedy,
    hf_greedy,
    merged_hf,
    output_ids,
    random_prompts,
    run_rows,
)
from tests.engine.test_task_deltas import ROW_TASKS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
STEPS = 16


def _transformers_tokens(base: Path, tasks_dir: Path, task: str | None, prompt: list[int]) -> list[int]:
    """Greedy tokens of the base merged with `task`'s delta (None: the base), run by transformers on DEVICE."""
    reference = merged_hf(base, tasks_dir / f"{task}.safetensors" if task else None).to(DEVICE)
    tokens, _ = hf_greedy(reference, prompt, STEPS)
    return tokens


async def _engine_tokens(base: Path, tasks_dir: Path, rows: list[tuple[str | None, list[int]]]) -> list[list[int]]:
    """Greedy tokens of every (task, prompt) row, all submitted at once to one float32 engine on DEVICE."""
    results = await run_rows(base, tasks_dir, rows, greedy(STEPS), device=DEVICE, dtype="float32")
    return [output_ids(chunks) for chunks in results]


@pytest.mark.parametrize("task", [None, "alpha"])
async def test_engine_on_cuda_alone_equals_merged_transformers(
    tiny_model: Path, tiny_tasks: Path, task: str | None
) -> None:
    prompt = random_prompts(1, 400)[0]
    [ours] = await _engine_tokens(tiny_model, tiny_tasks, [(task, prompt)])
    assert ours == _transformers_tokens(tiny_model, tiny_tasks, task, prompt)


async def test_engine_on_cuda_mixed_batch_equals_merged_transformers(tiny_model: Path, tiny_tasks: Path) -> None:
    rows = list(zip(ROW_TASKS, random_prompts(len(ROW_TASKS), 400)))
    ours = await _engine_tokens(tiny_model, tiny_tasks, rows)
    for (task, prompt), tokens in zip(rows, ours):
        assert tokens == _transformers_tokens(tiny_model, tiny_tasks, task, prompt), task
