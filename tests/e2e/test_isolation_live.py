"""Tenants never hurt each other, on a live server through the official client: 16 streams of three tasks
and the base run while poison requests arrive (parameters at the edge of what is accepted, inputs that
must be refused, an unknown task, a client that vanishes mid-stream). Every stream completes with the
tokens it has when it runs alone; every poison gets its own answer, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from live import ADMIN_KEY, LiveServer, publish_synthetic_tasks, start_server

TASK_NAMES = ("north", "south", "east")
STREAMS = 16
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("isolation-live")
    live = start_server(tiny_model, root / "server", DELTASERVE_MAX_BATCH_TOKENS="64")
    publish_synthetic_tasks(live, tiny_model, root, TASK_NAMES, 11)
    yield live
    live.stop()


def _specs() -> list[tuple[str, str]]:
    """(model, user message) of each stream: tasks and the base in turn, different prompts."""
    models = (*TASK_NAMES, "tiny")
    return [(models[i % len(models)], f"stream {i}: tell me about the number {i * 7}") for i in range(STREAMS)]


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)


def _alone(server: LiveServer, model: str, text: str) -> str:
    reply = _client(server).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].message.content or ""


def _stream(server: LiveServer, model: str, text: str) -> tuple[str, str | None]:
    """The streamed text and finish_reason; an error event in the stream raises."""
    stream = _client(server).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish


def _poisons() -> list[dict]:
    base = {"model": "north", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    return [
        {**base, "temperature": 1e-300},
        {**base, "top_p": 1e-300, "temperature": 1.0},
        {**base, "temperature": 1e-300, "top_p": 1e-300, "model": "tiny"},
        {**base, "seed": 2**64},
        {**base, "stop": ["x" * 6000] * 2000},
        {**base, "model": "no-such-task"},
        {**base, "messages": [{"role": "user", "content": "\ud800"}]},
    ]


def _send_raw(server: LiveServer, body: dict) -> int:
    data = json.dumps(body, ensure_ascii=True).encode()
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=data,
        timeout=120,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        assert set(reply.json()["error"]) >= {"message", "type", "param", "code"}, reply.text
    return reply.status_code


def _vanish(server: LiveServer) -> None:
    """Open a stream, read one event, and drop the connection."""
    body = {"model": "south", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True}
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as reply:
        next(reply.iter_lines())


def test_poison_requests_among_16_live_streams_fail_none_of_them(server: LiveServer) -> None:
    specs = _specs()
    expected = [_alone(server, model, text) for model, text in specs]
    with ThreadPoolExecutor(STREAMS + 8) as pool:
        streams = [pool.submit(_stream, server, model, text) for model, text in specs]
        poisons = [pool.submit(_send_raw, server, body) for body in _poisons()]
        vanished = pool.submit(_vanish, server)
        results = [future.result() for future in streams]
        statuses = [future.result() for future in poisons]
        vanished.result()
    for (model, _), want, (text, finish) in zip(specs, expected, results):
        assert finish == "length", model
        assert text == want, model
    assert statuses[:3] == [200, 200, 200]
    assert all(400 <= status < 500 for status in statuses[3:]), statuses
