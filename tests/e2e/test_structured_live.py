"""Structured output, logit_bias and n through the official client on a live server: JSON-schema output
on tasks and the base validates for several seeds and temperatures inside batches that mix constrained
and free rows of different tasks; json_object, guided regex and choice; streaming; logit_bias bans and
forces tokens; n=3 gives three indexed choices with the prompt counted once; bad grammars are 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from live import ADMIN_KEY, LiveServer, publish_synthetic_tasks, start_server

TASK_NAMES = ("invoices", "tickets")
SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 10},
        "total": {"type": "integer", "minimum": 0, "maximum": 10000},
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "lines": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 6},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["vendor", "total", "paid", "currency", "lines"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("structured-live")
    live = start_server(tiny_model, root / "server", DELTASERVE_MAX_BATCH_TOKENS="128")
    publish_synthetic_tasks(live, tiny_model, root, TASK_NAMES, 21)
    yield live
    live.stop()


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)


def _structured(server: LiveServer, model: str, seed: int, temperature: float) -> tuple[str, str | None]:
    reply = _client(server).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"invoice {seed}"}],
        response_format=FORMAT,
        seed=seed,
        temperature=temperature,
        max_tokens=200,
    )
    return reply.choices[0].message.content or "", reply.choices[0].finish_reason


def _free(server: LiveServer, model: str, text: str) -> str:
    reply = _client(server).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].message.content or ""


def test_json_schema_output_validates_in_batches_mixing_free_rows_of_other_tasks(server: LiveServer) -> None:
    models = (*TASK_NAMES, "tiny")
    runs = [(models[i % 3], seed, (0.0, 0.6, 1.0, 1.4)[i % 4]) for i, seed in enumerate(range(12))]
    free = [(models[(i + 1) % 3], f"free row {i}") for i in range(6)]
    alone = [_free(server, model, text) for model, text in free]
    with ThreadPoolExecutor(len(runs) + len(free)) as pool:
        structured = [pool.submit(_structured, server, *run) for run in runs]
        mixed = [pool.submit(_free, server, model, text) for model, text in free]
        outputs = [future.result() for future in structured]
        assert [future.result() for future in mixed] == alone
    for (model, seed, temperature), (text, finish) in zip(runs, outputs):
        assert finish == "stop", (model, seed, temperature, text)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_streamed_json_schema_output_validates(server: LiveServer) -> None:
    for seed in range(3):
        stream = _client(server).chat.completions.create(
            model=TASK_NAMES[seed % 2],
            messages=[{"role": "user", "content": "stream it"}],
            response_format=FORMAT,
            seed=seed,
            temperature=1.0,
            max_tokens=200,
            stream=True,
        )
        pieces, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert finish == "stop"
        jsonschema.validate(json.loads("".join(pieces)), SCHEMA)


def test_json_object_regex_and_choice_on_both_endpoints(server: LiveServer) -> None:
    client = _client(server)
    stopped = 0
    for seed in range(6):
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"obj {seed}"}],
            response_format={"type": "json_object"},
            seed=seed,
            max_tokens=200,
        )
        if reply.choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    assert stopped >= 3  # a random model's object may outrun max_tokens; these seeds mostly close it
    regex = client.completions.create(
        model=TASK_NAMES[0], prompt="code:", max_tokens=20, seed=3, extra_body={"guided_regex": "[A-Z]{2}-[0-9]{4}"}
    )
    assert regex.choices[0].finish_reason == "stop" and len(regex.choices[0].text) == 7
    assert regex.choices[0].text[2] == "-" and regex.choices[0].text[3:].isdigit()
    choice = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "mood?"}],
        n=3,
        seed=5,
        max_tokens=10,
        extra_body={"guided_choice": ["happy", "sad"]},
    )
    assert {c.message.content for c in choice.choices} <= {"happy", "sad"}


def test_logit_bias_minus_100_bans_tokens_and_plus_100_forces_one(server: LiveServer) -> None:
    client = _client(server)

    def ids(**kw: object) -> list[int]:
        reply = client.completions.create(
            model=TASK_NAMES[1],
            prompt="once upon a time",
            max_tokens=12,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
            **kw,
        )  # type: ignore[arg-type]
        return reply.choices[0].model_extra["token_ids"]  # type: ignore[index]

    plain = ids()
    banned = ids(logit_bias={str(t): -100 for t in set(plain)})
    assert len(banned) == 12 and not set(banned) & set(plain)
    assert ids(logit_bias={"42": 100}) == [42] * 12


def test_n_3_gives_three_indexed_choices_with_the_prompt_counted_once(server: LiveServer) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "three takes on one prompt"}]
    one = client.chat.completions.create(model=TASK_NAMES[0], messages=messages, max_tokens=5)
    reply = client.chat.completions.create(
        model=TASK_NAMES[0], messages=messages, n=3, seed=9, max_tokens=10, extra_body={"return_token_ids": True}
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    tokens = [len(c.model_extra["token_ids"]) for c in reply.choices]  # type: ignore[index]
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    assert (
        reply.usage.completion_tokens == sum(tokens)
        and reply.usage.total_tokens == sum(tokens) + one.usage.prompt_tokens
    )
    stream = client.chat.completions.create(
        model=TASK_NAMES[0],
        messages=messages,
        n=3,
        seed=9,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finished, usage = ["", "", ""], set(), None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2} and texts == [c.message.content for c in reply.choices]
    assert usage is not None and usage.completion_tokens == sum(tokens)
    completion = client.completions.create(model="tiny", prompt="abc", n=3, max_tokens=4, stream=True)
    assert {c.index for chunk in completion for c in chunk.choices} == {0, 1, 2}


@pytest.mark.parametrize(
    "kw, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format",
        ),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
        ({"logit_bias": {"99999": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_an_uncompilable_grammar_or_a_bad_bias_is_a_400_naming_it(server: LiveServer, kw: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        _client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, **kw
        )
    assert refused.value.param == param
