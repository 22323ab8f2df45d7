"""The eval harness on the tiny model: batched greedy decoding, scoring order, base + artifact merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testbed_fakes import low_rank_finetune
from transformers import AutoTokenizer

from bench.testbed.evaluate import (
    base_state_dict,
    evaluate,
    generate_answers,
    generate_token_ids,
    load_merged,
    load_model,
)
from bench.testbed.tasks import TASKS, Example, make_splits

SMALL = {"train": 4, "val": 4, "test": 8}


@pytest.fixture(autouse=True)
def one_torch_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_batched_left_padded_answers_equal_one_by_one(tiny_model: Path) -> None:
    task = TASKS["extraction"]
    prompts = [example.prompt for example in make_splits(task, SMALL)["test"]]
    model, tokenizer = load_model(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    batched = generate_answers(model, tokenizer, task, prompts, batch_size=8)
    single = generate_answers(model, tokenizer, task, prompts, batch_size=1)
    assert batched == single
    assert len(set(batched)) > 1, "a random model should not answer every prompt alike"


def test_score_pairs_each_prediction_with_its_own_example(tiny_model: Path) -> None:
    task = TASKS["dates"]
    prompts = [example.prompt for example in make_splits(task, SMALL)["test"]]
    model, tokenizer = load_model(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    predictions = generate_answers(model, tokenizer, task, prompts)
    examples = [Example(p, a if i % 2 == 0 else a + "x") for i, (p, a) in enumerate(zip(prompts, predictions))]
    result = evaluate(model, tokenizer, task, examples)
    assert result.count == 8 and result.predictions == tuple(predictions)
    assert result.score == 0.5


@pytest.mark.parametrize("method", ["lowrank", "impart"])
def test_base_plus_artifact_carries_the_reconstructed_delta(tiny_model: Path, tmp_path: Path, method: str) -> None:
    from compressor import compress, load_artifact

    finetuned = low_rank_finetune(tiny_model, tmp_path / "ft")
    compress(tiny_model, finetuned, tmp_path / "delta.safetensors", method=method, ratio=8.0)
    artifact = load_artifact(tmp_path / "delta.safetensors", tiny_model)
    merged = load_merged(tiny_model, tmp_path / "delta.safetensors").state_dict()
    base = base_state_dict(tiny_model)
    for module in artifact.modules():
        torch.testing.assert_close(merged[module.name], base[module.name] + module.dense())
    assert any(module.dense().abs().sum() > 0 for module in artifact.modules())


def test_engine_answer_tokens_agree_with_merged_weights(tiny_model: Path, tmp_path: Path) -> None:
    from bench.testbed.engine_eval import engine_token_ids
    from compressor import compress

    task = TASKS["routing"]
    prompts = [example.prompt for example in make_splits(task, SMALL)["test"]]
    finetuned = low_rank_finetune(tiny_model, tmp_path / "ft")
    compress(tiny_model, finetuned, tmp_path / "delta.safetensors", method="impart", ratio=8.0)
    merged = load_merged(tiny_model, tmp_path / "delta.safetensors")
    expected = generate_token_ids(merged, AutoTokenizer.from_pretrained(tiny_model), task, prompts)
    assert engine_token_ids(tiny_model, tmp_path / "delta.safetensors", task, prompts) == expected
    assert engine_token_ids(tiny_model, None, task, prompts) != expected, "the delta should change some answer"
