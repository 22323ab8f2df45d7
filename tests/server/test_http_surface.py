"""The HTTP edge over real TCP (uvicorn in a thread, real engine on the tiny base): the catch-all 500,
errors while streaming, kept-alive connections, hostile inputs that once gave 500s or stalls, caps on
stop strings, refused unsupported fields, /metrics access, and the openai client's ordinary calls."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from live_app import ADMIN_KEY, API_KEY, keyed_app, serving

import server.api.serving_chat as serving_chat
from server.api.errors import from_engine
from server.api.middleware import RequestContextMiddleware
from server.engine.types import EngineError, GenerationChunk, GenerationRequest, RequestFailedError
from server.observability.metrics import Metrics

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3, "temperature": 0}
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def live(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    app = keyed_app(tiny_model, tmp_path_factory.mktemp("surface"))
    with serving(app) as url:
        yield url, app.state.deltaserve


@pytest.fixture()
def client(live: tuple[str, Any]) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=live[0], headers=ADMIN, timeout=60, limits=limits) as one_connection:
        yield one_connection


def _port(reply: httpx.Response) -> int:
    """The client-side port of the connection that carried `reply` (same port: same connection)."""
    return reply.extensions["network_stream"].get_extra_info("client_addr")[1]


def _error(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def test_an_unexpected_exception_is_a_500_without_internal_text_on_a_kept_connection(
    client: httpx.Client, live: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(req: object) -> list[int]:
        raise RuntimeError("secret internal detail at /srv/x.py")

    monkeypatch.setattr(live[1].chat, "prompt_ids", broken)
    failed = client.post("/v1/chat/completions", json=CHAT)
    error = _error(failed, 500)
    request_id = failed.headers["x-request-id"]
    assert error == {
        "message": f"Internal server error (request id {request_id}).",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "secret" not in failed.text
    monkeypatch.undo()
    good = client.post("/v1/chat/completions", json=CHAT)
    assert good.status_code == 200 and _port(good) == _port(failed)


def test_an_exception_raised_in_a_middleware_is_a_500_in_openai_shape() -> None:
    async def failing(scope: object, receive: object, send: object) -> None:
        raise ValueError("internal detail")

    with serving(RequestContextMiddleware(failing, Metrics())) as url, httpx.Client(base_url=url) as client:
        first, second = client.get("/anything"), client.post("/other", json={})
        assert _error(first, 500)["code"] == "internal_error" and "internal detail" not in first.text
        assert first.headers["x-request-id"] in first.json()["error"]["message"]
        assert _error(second, 500)["type"] == "server_error" and _port(first) == _port(second)


def test_an_exception_while_streaming_ends_the_stream_with_an_error_event_then_done(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(tokens: object) -> dict:
        raise KeyError("internal")

    monkeypatch.setattr(serving_chat, "chat_logprobs", broken)
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "logprobs": True})
    events = _events(streamed.text)
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and streamed.headers["x-request-id"] in error["message"]
    monkeypatch.undo()
    good = client.post("/v1/chat/completions", json=CHAT)
    assert good.status_code == 200 and _port(good) == _port(streamed)


def _failing_after_one_chunk(message: str) -> Any:
    async def generate(request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(request.request_id, "a", (5,), None, len(request.prompt_token_ids), 1)
        raise RequestFailedError(message)

    return generate


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_failed_in_the_engine_is_a_500_request_failed_with_its_message(
    client: httpx.Client, live: tuple[str, Any], monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    message = "The model produced non-finite values for this request."
    monkeypatch.setattr(live[1].engine, "generate", _failing_after_one_chunk(message))
    reply = client.post("/v1/completions", json={**COMPLETION, "stream": stream})
    if stream:
        events = _events(reply.text)
        error = json.loads(events[-2])["error"]
        assert reply.status_code == 200 and events[-1] == "[DONE]"
    else:
        error = _error(reply, 500)
    assert error == {"message": message, "type": "server_error", "param": None, "code": "request_failed"}


def test_an_unknown_engine_error_maps_to_500_without_its_text() -> None:
    error = from_engine(EngineError("KeyError at /srv/engine.py:12"), "tiny")
    assert error.status == 500 and error.code == "internal_error" and "srv" not in error.message
    assert from_engine(RequestFailedError("Sampling failed for this request."), "tiny").code == "request_failed"


SURROGATE = "\ud800"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, "seed"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
            "messages.0.content.0.text",
        ),
        ("/v1/completions", {**COMPLETION, "prompt": f"a{SURROGATE}b"}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [SURROGATE]}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "model": SURROGATE}, "model"),
        ("/v1/chat/completions", {**CHAT, "stop": [SURROGATE]}, "stop"),
        ("/v1/completions", {**COMPLETION, "stop": SURROGATE}, "stop"),
        ("/v1/chat/completions", {**CHAT, "user": SURROGATE}, "user"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "x", "name": SURROGATE}]},
            "messages.0.name",
        ),
        ("/v1/chat/completions", {**CHAT, "temperature": float("nan")}, "temperature"),
        ("/v1/completions", {**COMPLETION, "top_p": float("inf")}, "top_p"),
        ("/v1/completions", {**COMPLETION, "stop_token_ids": [10**9]}, "stop_token_ids"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
        ),
    ],
)
def test_hostile_values_are_400_naming_the_parameter(client: httpx.Client, path: str, body: dict, param: str) -> None:
    reply = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    error = _error(reply, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert client.post(path, json=CHAT if "chat" in path else COMPLETION).status_code == 200


def test_a_task_header_that_is_not_utf8_is_a_404_in_openai_shape(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=CHAT, headers={"X-Task": b"\xed\xa0\x80"})
    assert _error(reply, 404)["code"] == "model_not_found"


def test_invalid_json_is_400_without_a_param(client: httpx.Client) -> None:
    reply = client.post(
        "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
    )
    assert _error(reply, 400)["param"] is None


def test_thousands_of_long_stop_strings_are_refused_at_once(client: httpx.Client) -> None:
    """The abusive request: 2,000 stop strings of 6,000 characters (12 MB) with max_tokens 450."""
    started = time.perf_counter()
    reply = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 450, "stop": ["x" * 6000] * 2000})
    assert _error(reply, 400)["param"] == "stop"
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "change, param",
    [
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop_token_ids": [1] * 65}, "stop_token_ids"),
    ],
)
def test_stop_limits_are_settings(client: httpx.Client, change: dict, param: str) -> None:
    assert _error(client.post("/v1/completions", json={**COMPLETION, **change}), 400)["param"] == param


def test_stop_strings_at_the_limits_are_served(client: httpx.Client) -> None:
    body = {**COMPLETION, "stop": [f"{i:03d}" + "y" * 253 for i in range(16)], "stop_token_ids": [1] * 64}
    assert client.post("/v1/completions", json=body).status_code == 200


def test_a_chunked_body_over_the_cap_is_413(client: httpx.Client, live: tuple[str, Any]) -> None:
    cap = live[1].settings.max_request_bytes
    piece = b"x" * (1 << 20)

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(cap // len(piece) + 1):
            yield piece
        yield b'"}'

    reply = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert _error(reply, 413)["code"] == "request_too_large"


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "tool_choice", "auto"),
        ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
        ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
        ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
        ("/v1/chat/completions", "parallel_tool_calls", False),
        ("/v1/chat/completions", "modalities", ["text"]),
        ("/v1/completions", "best_of", 2),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "suffix", "end"),
        ("/v1/completions", "made_up_field", 1),
    ],
)
def test_fields_the_server_does_not_honour_are_400_unsupported_parameter(
    client: httpx.Client, path: str, field: str, value: object
) -> None:
    body = {**(CHAT if "chat" in path else COMPLETION), field: value}
    error = _error(client.post(path, json=body), 400)
    assert error["code"] == "unsupported_parameter" and error["param"] == field


def test_a_message_field_the_server_does_not_honour_is_refused_by_its_path(client: httpx.Client) -> None:
    body = {**CHAT, "messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}
    error = _error(client.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "unsupported_parameter" and error["param"] == "messages.0.tool_calls"


def test_unsupported_fields_sent_as_null_and_metadata_fields_are_accepted(client: httpx.Client) -> None:
    body = {
        **CHAT,
        "tools": None,
        "logit_bias": None,
        "user": "user-42",
        "echo": None,
        "messages": [{"role": "user", "content": "hi", "name": "ann"}],
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_metrics_need_the_admin_key_when_keys_are_configured(live: tuple[str, Any]) -> None:
    url = live[0]
    assert _error(httpx.get(f"{url}/metrics"), 401)["code"] == "invalid_api_key"
    assert _error(httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}), 403)
    scraped = httpx.get(f"{url}/metrics", headers=ADMIN)
    assert scraped.status_code == 200 and "deltaserve_http_requests_total" in scraped.text


def test_metrics_access_open_lets_any_caller_scrape(tiny_model: Path, tmp_path: Path) -> None:
    with serving(keyed_app(tiny_model, tmp_path, metrics_access="open")) as url:
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_the_openai_clients_ordinary_calls_pass(live: tuple[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{live[0]}/v1", api_key=ADMIN_KEY, max_retries=0)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        seed=7,
        stop=["\n\n"],
        user="u1",
        top_p=0.9,
        max_completion_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 3
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=3, seed=2**63 - 1, logprobs=1)
    assert completion.usage.completion_tokens <= 3
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "tools"


@pytest.mark.parametrize(
    "change, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_regex": "x" * ((1 << 16) + 1)}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"--5": 1}}, "logit_bias"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_structured_output_bias_and_n_fields_are_400_naming_them(
    client: httpx.Client, change: dict, param: str
) -> None:
    error = _error(client.post("/v1/chat/completions", json={**CHAT, **change}), 400)
    assert error["param"].split(".")[0] == param and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize(
    "path, change, param",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x" * (1 << 18)}, {"role": "user", "content": "y"}]},
            "messages",
        ),
        ("/v1/completions", {"prompt": "x" * ((1 << 18) + 1)}, "prompt"),
        ("/v1/completions", {"prompt": [1] * 512}, "prompt"),
    ],
)
def test_prompts_too_large_to_tokenize_cheaply_are_400(
    client: httpx.Client, path: str, change: dict, param: str
) -> None:
    body = {**(CHAT if "chat" in path else COMPLETION), **change}
    assert _error(client.post(path, json=body), 400)["param"] == param


def test_a_malformed_multipart_checkpoint_is_400_naming_the_file(client: httpx.Client) -> None:
    """Found by the fuzz (bench/fuzz_http.py --seed 1): the multipart parser's error was a 500."""
    reply = client.post(
        "/admin/v1/tasks/fuzzed/checkpoint",
        content=b"\x8e{",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert _error(reply, 400)["param"] == "file"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("seed=1180591620717411303424", "seed"),
        ("seed=-1", "seed"),
        ("ratio=inf", "ratio"),
        ("ratio=nan", "ratio"),
        ("ratio=1", "ratio"),
    ],
)
def test_checkpoint_query_parameters_out_of_range_are_400(client: httpx.Client, query: str, param: str) -> None:
    reply = client.post(
        f"/admin/v1/tasks/fuzzed/checkpoint?{query}",
        content=b"",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert _error(reply, 400)["param"] == param
