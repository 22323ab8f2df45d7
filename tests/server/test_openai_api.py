"""The OpenAI endpoints in-process (real engine on the tiny base): shapes, streaming, errors, keys, limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_settings
from server.engine.types import QueueFullError

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def client(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("api")
    settings = load_settings(
        base_model=str(tiny_model),
        registry_dir=tmp / "reg",
        work_dir=tmp / "work",
        kv_cache_bytes=4 << 20,
        max_request_bytes=4096,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def test_chat_completion_shape_and_usage(client: TestClient) -> None:
    reply = client.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    tokenizer = client.app.state.deltaserve.engine.tokenizer
    prompt = tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=True, tokenize=False)
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    assert reply.headers["x-request-id"]


def test_greedy_chat_is_deterministic_and_matches_its_stream(client: TestClient) -> None:
    once = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = _events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == once
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


def test_stream_include_usage_ends_with_a_usage_chunk(client: TestClient) -> None:
    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = _events(client.post("/v1/completions", json=body).text)
    last = json.loads(events[-2])
    assert events[-1] == "[DONE]" and last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3 and last["usage"]["prompt_tokens"] >= 1


def test_completion_accepts_token_ids_and_counts_them(client: TestClient) -> None:
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}).json()
    assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("model", ["nope", "tiny:nope"])
def test_unknown_task_is_404_model_not_found(client: TestClient, model: str) -> None:
    reply = client.post("/v1/chat/completions", json={**CHAT, "model": model})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found" and reply.json()["error"]["param"] == "model"


def test_x_task_header_wins_over_model(client: TestClient) -> None:
    reply = client.post("/v1/chat/completions", json=CHAT, headers={"X-Task": "missing-task"})
    assert reply.status_code == 404 and "missing-task" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": 3.0}, "temperature"),
        ({"n": 17}, "n"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(client: TestClient, change: dict, param: str) -> None:
    reply = client.post("/v1/chat/completions", json={**CHAT, **change})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_oversized_body_is_413(client: TestClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    reply = client.post("/v1/chat/completions", json=big)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"


def test_full_queue_is_429_with_retry_after(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(seq: object) -> None:
        raise QueueFullError("1024 requests are already waiting")

    monkeypatch.setattr(client.app.state.deltaserve.engine, "_submit", full)
    reply = client.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["type"] == "rate_limit_error"


def test_not_ready_is_503(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client.app.state.deltaserve, "draining", True)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 503
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200


def test_a_published_task_whose_delta_cannot_load_is_503_naming_it(client: TestClient) -> None:
    """Bytes in the registry that are no artifact (a damaged store, a hand-made publish): the request
    fails fast with a clear 503, and other requests keep being served."""
    client.app.state.deltaserve.registry.publish("broken", b"not a safetensors file", method="impart", ratio=32.0)
    reply = client.post("/v1/chat/completions", json=CHAT | {"model": "broken"})
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "task_unavailable" and "`broken`" in error["message"] and error["param"] == "model"
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_models_lists_the_base(client: TestClient) -> None:
    cards = client.get("/v1/models").json()["data"]
    assert cards[0]["id"] == "tiny" and cards[0]["owned_by"] == "deltaserve" and cards[0]["created"] > 0


def test_metrics_count_requests_tokens_and_latency(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=CHAT)
    text = client.get("/metrics").text
    assert 'deltaserve_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'deltaserve_completion_tokens_total{task="tiny"}' in text
    assert "deltaserve_time_to_first_token_seconds_count" in text
    assert "deltaserve_engine_kv_blocks_total" in text and 'deltaserve_jobs{state="running"} 0.0' in text


def test_unknown_route_uses_the_openai_error_shape(client: TestClient) -> None:
    reply = client.get("/v1/nothing")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


@pytest.fixture(scope="module")
def keyed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("keyed")
    settings = load_settings(
        base_model=str(tiny_model),
        registry_dir=tmp / "reg",
        work_dir=tmp / "work",
        kv_cache_bytes=4 << 20,
        admin_keys="adm",
        api_keys={"ka": ["a"], "kall": ["*"]},
    )
    with TestClient(create_app(settings)) as test_client:
        ctx = test_client.app.state.deltaserve
        for task in ("a", "b"):
            ctx.registry.publish(task, f"artifact {task}".encode(), method="impart", ratio=8.0)
        yield test_client


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_missing_or_wrong_are_401(keyed: TestClient) -> None:
    assert keyed.get("/v1/models").status_code == 401
    reply = keyed.post("/v1/chat/completions", json=CHAT, headers=_auth("guess"))
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_scoped_key_cannot_reach_another_task(keyed: TestClient) -> None:
    reply = keyed.post("/v1/chat/completions", json={**CHAT, "model": "b"}, headers=_auth("ka"))
    assert reply.status_code == 403 and reply.json()["error"]["type"] == "permission_error"
    header = keyed.post("/v1/chat/completions", json=CHAT, headers={**_auth("ka"), "X-Task": "b"})
    assert header.status_code == 403


def test_models_shows_only_the_keys_tasks(keyed: TestClient) -> None:
    scoped = [c["id"] for c in keyed.get("/v1/models", headers=_auth("ka")).json()["data"]]
    everything = [c["id"] for c in keyed.get("/v1/models", headers=_auth("kall")).json()["data"]]
    assert scoped == ["tiny", "a"] and everything == ["tiny", "a", "b"]


def test_admin_api_needs_an_admin_key(keyed: TestClient) -> None:
    assert keyed.get("/admin/v1/tasks").status_code == 401
    assert keyed.get("/admin/v1/tasks", headers=_auth("kall")).status_code == 403
    listed = keyed.get("/admin/v1/tasks", headers=_auth("adm")).json()["data"]
    assert [t["task"] for t in listed] == ["a", "b"]


def test_base_model_is_open_to_every_valid_key(keyed: TestClient) -> None:
    assert keyed.post("/v1/chat/completions", json=CHAT, headers=_auth("ka")).status_code == 200
