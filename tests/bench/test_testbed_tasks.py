"""The testbed's tasks: deterministic generators, disjoint splits, exact scorers."""

from __future__ import annotations

import json
import random

import pytest

from bench.testbed.tasks import (
    TASKS,
    exact_score,
    json_score,
    make_date,
    make_email,
    make_extraction,
    make_routing,
    make_splits,
)

SMALL = {"train": 200, "val": 30, "test": 30}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_deterministic_across_calls(name: str) -> None:
    assert make_splits(TASKS[name], SMALL) == make_splits(TASKS[name], SMALL)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_share_no_prompt_and_have_the_asked_sizes(name: str) -> None:
    splits = make_splits(TASKS[name], SMALL)
    prompts = {split: {example.prompt for example in examples} for split, examples in splits.items()}
    assert {split: len(p) for split, p in prompts.items()} == SMALL
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_reference_answer_scores_one_and_a_wrong_one_zero(name: str) -> None:
    task = TASKS[name]
    for example in make_splits(task, SMALL)["test"]:
        assert task.score(example.answer, example.answer) == 1.0
        assert task.score("I am not sure.", example.answer) == 0.0


def test_test_split_does_not_depend_on_train_size() -> None:
    task = TASKS["dates"]
    assert make_splits(task, SMALL)["test"] == make_splits(task, SMALL | {"train": 50})["test"]


def test_email_answer_is_the_lower_cased_name_at_the_company() -> None:
    for seed in range(50):
        example = make_email(random.Random(seed))
        local, domain = example.answer.split("@")
        first, last = local.split(".")
        assert example.answer == example.answer.lower() and domain.endswith(".com")
        assert all(part in example.prompt.lower() for part in (first, last, domain[: -len(".com")]))


def test_extraction_answer_holds_the_fields_of_the_sentence() -> None:
    example = make_extraction(random.Random(3))
    fields = json.loads(example.answer)
    assert sorted(fields) == ["age", "city", "job", "name"]
    assert all(str(value) in example.prompt for value in fields.values())


def test_dates_answer_is_iso_of_the_written_date() -> None:
    seen = {make_date(random.Random(seed)) for seed in range(200)}
    assert all(len(e.answer) == 10 and e.answer[4] == e.answer[7] == "-" for e in seen)
    assert all(str(int(e.answer[8:])) in e.prompt and e.answer[:4] in e.prompt for e in seen)


def test_routing_answer_is_one_of_the_four_departments() -> None:
    labels = {make_routing(random.Random(seed)).answer for seed in range(100)}
    assert labels == {"billing", "shipping", "technical", "account"}


def test_exact_score_ignores_surrounding_whitespace_only() -> None:
    assert exact_score(" 2021-03-05\n", "2021-03-05") == 1.0
    assert exact_score("2021-03-05.", "2021-03-05") == 0.0


def test_json_score_compares_objects_not_text() -> None:
    answer = '{"name":"Ana Berg","age":30,"city":"Oslo","job":"nurse"}'
    assert json_score('{"age": 30, "name": "Ana Berg", "job": "nurse", "city": "Oslo"}', answer) == 1.0
    assert json_score('{"name":"Ana Berg","age":"30","city":"Oslo","job":"nurse"}', answer) == 0.0
    assert json_score('{"name":"Ana Berg",', answer) == 0.0
