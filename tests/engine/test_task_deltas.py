"""Decoupled serving equals merged weights: rows of four tasks and of the base in one forward pass."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import kernels
from server.engine.kv_cache import KVCache
from server.engine.types import GenerationRequest
from server.model.attention import AttentionMeta, PrefillChunk
from server.model.deltas import StepDeltas, unpack_artifact
from server.model.llama import ForwardBatch, LlamaModel
from tests.engine.conftest import (
    TASKS,
    assert_logprobs_match,
    collect,
    greedy,
    hf_greedy,
    make_engine,
    merged_hf,
    output_ids,
    random_prompts,
    run_rows,
)

ROW_TASKS = ("alpha", None, "beta", "gamma", None, "delta")


def _mixed_prefill(
    model: LlamaModel, tasks_dir: Path, seq_tasks: tuple[str | None, ...], prompts: list[list[int]]
) -> torch.Tensor:
    """Prefill every prompt in ONE forward, each under its task; logits of every row: [rows, vocab]."""
    kv = KVCache(model.config, 8 << 20, 16, torch.device("cpu"), torch.float32)
    names = sorted({t for t in seq_tasks if t is not None})
    resident = [
        unpack_artifact(t, (tasks_dir / f"{t}.safetensors").read_bytes(), None, model.device, model.dtype)
        for t in names
    ]
    ids, positions, slots, chunks, row_slots = [], [], [], [], []
    for task, prompt in zip(seq_tasks, prompts):
        token_slots = kv.token_slots(kv.allocate(kv.blocks_needed(0, len(prompt))), len(prompt))
        chunks.append(PrefillChunk(len(ids), len(prompt), len(prompt), token_slots))
        ids += prompt
        positions += range(len(prompt))
        slots.append(token_slots)
        row_slots += [names.index(task) if task else -1] * len(prompt)
    rows = torch.arange(len(ids))
    batch = ForwardBatch(
        torch.tensor(ids), torch.tensor(positions), rows, AttentionMeta(torch.cat(slots), None, tuple(chunks))
    )
    return model.forward(batch, kv.layers, StepDeltas(resident, torch.tensor(row_slots), rows, model.dtype))


@pytest.mark.parametrize(
    ("base_fixture", "tasks_fixture", "seq_tasks"),
    [
        ("tiny_model", "tiny_tasks", ROW_TASKS),
        ("tiny_tied_model", "tiny_tied_tasks", ("alpha", None, "beta")),
    ],
)
def test_mixed_task_batch_logits_equal_merged_models(
    base_fixture: str, tasks_fixture: str, seq_tasks: tuple[str | None, ...], request: pytest.FixtureRequest
) -> None:
    base, tasks_dir = request.getfixturevalue(base_fixture), request.getfixturevalue(tasks_fixture)
    model = LlamaModel.from_dir(base)
    prompts = random_prompts(len(seq_tasks), model.config.vocab_size)
    logits = _mixed_prefill(model, tasks_dir, seq_tasks, prompts)
    start = 0
    for task, prompt in zip(seq_tasks, prompts):
        reference = merged_hf(base, tasks_dir / f"{task}.safetensors" if task else None)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert (logits[start : start + len(prompt)] - expected).abs().max() < 1e-4, task
        start += len(prompt)


def test_tasks_change_the_output(tiny_model: Path, tiny_tasks: Path) -> None:
    """Guards the test above against deltas too small to matter: each task's logits differ from the base's."""
    model = LlamaModel.from_dir(tiny_model)
    prompt = random_prompts(1, model.config.vocab_size)[0]
    logits = _mixed_prefill(model, tiny_tasks, (None, *TASKS), [prompt] * 5)
    per_seq = logits.view(5, len(prompt), -1)
    for i in range(1, 5):
        assert (per_seq[i] - per_seq[0]).abs().max() > 0.1


async def test_engine_greedy_over_mixed_tasks_equals_merged_models(tiny_model: Path, tiny_tasks: Path) -> None:
    prompts = random_prompts(len(ROW_TASKS), 400)
    results = await run_rows(tiny_model, tiny_tasks, list(zip(ROW_TASKS, prompts)), greedy(24, logprobs=0))
    for task, prompt, chunks in zip(ROW_TASKS, prompts, results):
        reference = merged_hf(tiny_model, tiny_tasks / f"{task}.safetensors" if task else None)
        tokens, logits = hf_greedy(reference, prompt, 24)
        assert output_ids(chunks) == tokens, task
        assert_logprobs_match(chunks, tokens, logits, task)


async def test_bfloat16_engine_serves_mixed_tasks_close_to_float32(tiny_model: Path, tiny_tasks: Path) -> None:
    prompts = random_prompts(len(ROW_TASKS), 400)
    logprobs = {}
    for dtype in ("float32", "bfloat16"):
        engine = make_engine(tiny_model, tiny_tasks, kv_cache_bytes=4 << 20, dtype=dtype)
        await engine.start()
        try:
            requests = [
                GenerationRequest(f"r{i}", t, tuple(p), greedy(1, logprobs=0))
                for i, (t, p) in enumerate(zip(ROW_TASKS, prompts))
            ]
            results = await asyncio.gather(*(collect(engine, r) for r in requests))
        finally:
            await engine.stop(timeout=1.0)
        logprobs[dtype] = torch.tensor([r[-1].logprobs[0].logprob for r in results])
    assert (logprobs["bfloat16"] - logprobs["float32"]).abs().max() < 0.1


def test_qwen2_biases_and_bias_deltas_match_merged_model(tiny_qwen2: tuple[Path, Path]) -> None:
    base, tasks_dir = tiny_qwen2
    model = LlamaModel.from_dir(base)
    assert model.config.attention_bias
    prompts = random_prompts(2, model.config.vocab_size)
    logits = _mixed_prefill(model, tasks_dir, ("q", None), prompts)
    for start, task, prompt in ((0, "q", prompts[0]), (len(prompts[0]), None, prompts[1])):
        reference = merged_hf(base, tasks_dir / "q.safetensors" if task else None)
        assert type(reference).__name__ == "Qwen2ForCausalLM"
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert (logits[start : start + len(prompt)] - expected).abs().max() < 1e-4


async def test_each_step_plans_its_rows_once_and_lays_out_each_chunk_once(
    tiny_model: Path, tiny_tasks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many layers and linears: per step, kernels.plan_batch runs twice (the step's rows, reused by
    every linear; the logit rows, for the LM head) and each chunk's KV slots are computed once."""
    counts = {"plans": 0, "deltas": 0, "slots": 0, "chunks": 0, "steps": 0}

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            counts[name] += 1
            return fn(*args)

        return wrapper

    monkeypatch.setattr(kernels, "plan_batch", counted("plans", kernels.plan_batch))
    monkeypatch.setattr(kernels, "add_delta", counted("deltas", kernels.add_delta))
    engine = make_engine(tiny_model, tiny_tasks, kv_cache_bytes=4 << 20, max_batch_tokens=16)
    await engine.start()
    try:
        runner, kv = engine.core.runner, engine.core.kv
        real_step = runner.step

        def step(chunks: list[Any]) -> Any:
            counts["steps"] += 1
            counts["chunks"] += len(chunks)
            return real_step(chunks)

        monkeypatch.setattr(runner, "step", step)
        monkeypatch.setattr(kv, "token_slots", counted("slots", kv.token_slots))
        prompts = random_prompts(3, 400)  # 5, 8 and 11 tokens: prefills chunked by the 16-token budget
        requests = [GenerationRequest(f"p{i}", TASKS[i], tuple(p), greedy(6)) for i, p in enumerate(prompts)]
        await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        await engine.stop(timeout=1.0)
    layers = engine.config.num_hidden_layers
    assert layers > 1 and counts["steps"] > 3
    assert counts["plans"] == 2 * counts["steps"]
    assert counts["slots"] == counts["chunks"]
    assert counts["deltas"] >= 7 * layers * counts["steps"]  # the plans were reused by every linear
