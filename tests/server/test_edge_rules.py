"""Rules of the HTTP edge that have one owner: the sampling bounds (server.engine.validation, which the
protocol's fields declare), the vocabulary bound (the model's vocab_size), the registry errors' HTTP
answers (server.api.errors.from_registry, the app's one handler), the compression method lists
(compressor.METHODS / ADAPTER_METHODS), and the admin and health routes' response models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

import compressor
from server.api.errors import from_engine, from_registry
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.app import create_app
from server.config import load_settings
from server.engine import validation
from server.engine.types import GenerationRequest, InvalidRequestError, SamplingParams
from server.registry import (
    BlobCorruptError,
    InvalidTaskNameError,
    RegistryError,
    RegistryUnavailableError,
    TaskMissingError,
)

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def client(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("edge")
    settings = load_settings(
        base_model=str(tiny_model), registry_dir=tmp / "reg", work_dir=tmp / "work", kv_cache_bytes=4 << 20
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _bounds(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The numeric constraints pydantic holds for a field: {"ge": .., "le": .., "gt": ..}."""
    found: dict[str, Any] = {}
    for item in model.model_fields[name].metadata:
        found.update({key: getattr(item, key) for key in ("ge", "le", "gt", "lt") if hasattr(item, key)})
    return found


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_the_protocol_declares_the_engines_bounds(model: type[BaseModel]) -> None:
    v = validation
    assert _bounds(model, "temperature") == {"ge": v.TEMPERATURE_MIN, "le": v.TEMPERATURE_MAX}
    assert _bounds(model, "top_p") == {"gt": v.TOP_P_MIN, "le": v.TOP_P_MAX}
    assert _bounds(model, "top_k") == {"ge": v.TOP_K_MIN}
    assert _bounds(model, "max_tokens") == {"ge": v.MAX_TOKENS_MIN}
    for penalty in ("presence_penalty", "frequency_penalty"):
        assert _bounds(model, penalty) == {"ge": v.PENALTY_MIN, "le": v.PENALTY_MAX}
    logprobs = "top_logprobs" if model is ChatCompletionRequest else "logprobs"
    assert _bounds(model, logprobs) == {"ge": 0, "le": v.MAX_LOGPROBS}


OUT_OF_BOUNDS = [
    ("temperature", validation.TEMPERATURE_MAX + 0.01),
    ("temperature", validation.TEMPERATURE_MIN - 0.01),
    ("top_p", validation.TOP_P_MIN),
    ("top_p", validation.TOP_P_MAX + 0.01),
    ("top_k", validation.TOP_K_MIN - 1),
    ("max_tokens", validation.MAX_TOKENS_MIN - 1),
    ("presence_penalty", validation.PENALTY_MAX + 0.01),
    ("frequency_penalty", validation.PENALTY_MIN - 0.01),
    ("logprobs", validation.MAX_LOGPROBS + 1),
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_BOUNDS)
def test_a_value_past_a_bound_is_refused_by_the_protocol_and_the_engine_naming_it(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as refused:
        CompletionRequest(model="m", prompt="x", **{field: value})
    assert refused.value.errors()[0]["loc"][0] == field
    request = GenerationRequest("r", None, (1, 2), SamplingParams(**{field: value}))
    with pytest.raises(InvalidRequestError) as engine_refused:
        validation.validate_request(request, max_model_len=64, vocab_size=32)
    assert engine_refused.value.param == field


def test_values_at_the_bounds_pass_both() -> None:
    v = validation
    edge = {
        "temperature": v.TEMPERATURE_MAX,
        "top_p": v.TOP_P_MAX,
        "presence_penalty": v.PENALTY_MIN,
        "frequency_penalty": v.PENALTY_MAX,
        "logprobs": v.MAX_LOGPROBS,
    }
    CompletionRequest(model="m", prompt="x", max_tokens=v.MAX_TOKENS_MIN, **edge)
    params = SamplingParams(max_tokens=v.MAX_TOKENS_MIN, logit_bias=((0, v.LOGIT_BIAS_MAX),), **edge)
    validation.validate_request(GenerationRequest("r", None, (1,), params), max_model_len=2, vocab_size=32)


def test_a_prompt_must_leave_room_for_one_token() -> None:
    assert validation.context_room(63, 64) == validation.MAX_TOKENS_MIN
    with pytest.raises(InvalidRequestError) as refused:
        validation.validate_request(GenerationRequest("r", None, (1,) * 64), max_model_len=64, vocab_size=32)
    assert refused.value.param == "prompt"


def test_token_ids_must_index_the_models_vocabulary(client: TestClient) -> None:
    """The bound is the model's vocab_size (rows of its embedding and logits), whoever sends the ids."""
    vocab_size = client.app.state.deltaserve.engine.config.vocab_size
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": [vocab_size - 1, 0]}).status_code == 200
    for prompt in ([vocab_size], [-1, 3]):
        reply = client.post("/v1/completions", json={**COMPLETION, "prompt": prompt})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text
    bias = client.post("/v1/completions", json={**COMPLETION, "logit_bias": {str(vocab_size): 1}})
    assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"


def test_an_empty_prompt_is_400_naming_it(client: TestClient) -> None:
    reply = client.post("/v1/completions", json={**COMPLETION, "prompt": ""})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"


def test_a_text_prompt_longer_than_the_context_is_400_naming_prompt(client: TestClient) -> None:
    max_model_len = client.app.state.deltaserve.engine.max_model_len
    reply = client.post("/v1/completions", json={**COMPLETION, "prompt": "hello " * max_model_len})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text


@pytest.mark.parametrize(
    ("error", "status", "code", "param"),
    [
        (RegistryUnavailableError("redis down"), 503, "registry_unavailable", None),
        (InvalidTaskNameError("invalid task name '..'"), 400, "invalid_value", "task"),
        (TaskMissingError("no task 'x'"), 404, "not_found", None),
        (BlobCorruptError("sha mismatch"), 500, "internal_error", None),
    ],
)
def test_registry_errors_map_to_http_in_one_place(error: RegistryError, status: int, code: str, param: str) -> None:
    answer = from_registry(error)
    assert (answer.status, answer.code, answer.param) == (status, code, param)
    assert "redis" not in answer.message and "sha" not in answer.message
    if isinstance(error, RegistryUnavailableError):
        assert answer.headers["Retry-After"] and from_engine(error, "m") == answer


def test_a_registry_error_a_route_lets_through_gets_the_handlers_answer(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = client.app.state.deltaserve.registry

    def away() -> None:
        raise RegistryUnavailableError("redis down")

    monkeypatch.setattr(registry, "entries", away)
    monkeypatch.setattr(registry, "tasks", away)
    for reply in (client.get("/admin/v1/tasks"), client.get("/v1/models")):
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "registry_unavailable"
        assert reply.headers["retry-after"] == "1"
    missing = client.post("/admin/v1/tasks/never-published/rollback", json={"version": 1})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    invalid = client.delete("/admin/v1/tasks/bad..name")
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "task"


def _checkpoint_upload(client: TestClient, kind: str, method: str) -> dict[str, Any]:
    reply = client.post(
        f"/admin/v1/tasks/t/{kind}?method={method}",
        content=b"\x8e{",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert reply.status_code == 400, reply.text
    error: dict[str, Any] = reply.json()["error"]
    return error


def test_upload_methods_are_the_compressors_lists(client: TestClient) -> None:
    for method in compressor.METHODS:
        assert _checkpoint_upload(client, "checkpoint", method)["param"] == "file"
    for method in compressor.ADAPTER_METHODS:
        assert _checkpoint_upload(client, "adapter", method)["param"] == "file"
    assert _checkpoint_upload(client, "checkpoint", "bogus")["param"] == "method"
    outside = [m for m in compressor.METHODS if m not in compressor.ADAPTER_METHODS]
    assert _checkpoint_upload(client, "adapter", outside[0])["param"] == "method"


def _response_schema(spec: dict[str, Any], path: str, method: str, status: str) -> str:
    content = spec["paths"][path][method]["responses"][status]["content"]["application/json"]
    return str(content["schema"].get("$ref", "")).rsplit("/", 1)[-1]


def test_admin_and_health_responses_are_described_in_the_openapi_schema(client: TestClient) -> None:
    spec = client.app.openapi()
    assert _response_schema(spec, "/admin/v1/tasks", "get", "200") == "TaskList"
    assert _response_schema(spec, "/admin/v1/tasks/{task}", "get", "200") == "TaskView"
    assert _response_schema(spec, "/admin/v1/tasks/{task}/versions", "get", "200") == "VersionList"
    assert _response_schema(spec, "/admin/v1/tasks/{task}/artifact", "put", "201") == "TaskVersion"
    assert _response_schema(spec, "/admin/v1/tasks/{task}/checkpoint", "post", "202") == "Job"
    assert _response_schema(spec, "/admin/v1/jobs", "get", "200") == "JobList"
    assert _response_schema(spec, "/admin/v1/stats", "get", "200") == "EngineStats"
    assert _response_schema(spec, "/ready", "get", "200") == "Readiness"
    assert _response_schema(spec, "/health", "get", "200") == "Health"
    assert client.get("/ready").json() == {"status": "ready", "base": "tiny"}
