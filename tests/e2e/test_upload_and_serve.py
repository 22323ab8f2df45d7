"""A live server with a local registry: upload -> compress -> publish -> serve through the official
`openai` client (sync, async, streaming), agreeing with the merged-weights reference; admin flows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from live import LiveServer, checkpoint_files, greedy_reference, start_server, wait_job

MATH_KEY, ALL_KEY = "key-for-math", "key-for-all"
UPLOAD_CAP = 1 << 20
SHUTDOWN_TIMEOUT_S = 0.3
"""Far shorter than a full-context stream of the tiny model, even on an idle machine."""
MESSAGES = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(
        tiny_model,
        tmp_path_factory.mktemp("live"),
        DELTASERVE_MAX_UPLOAD_BYTES=str(UPLOAD_CAP),
        DELTASERVE_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT_S),
        DELTASERVE_API_KEYS=f'{{"{MATH_KEY}": ["math"], "{ALL_KEY}": ["*"]}}',
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def published(server: LiveServer, finetunes: dict[str, Path]) -> dict[str, dict]:
    """Both fine-tunes uploaded as checkpoints and compressed by the server's jobs."""
    jobs = {}
    with server.admin() as admin:
        for task, folder in finetunes.items():
            reply = admin.post(
                f"/admin/v1/tasks/{task}/checkpoint", params={"ratio": 8}, files=checkpoint_files(folder)
            )
            assert reply.status_code == 202, reply.text
            jobs[task] = reply.json()["id"]
        return {task: wait_job(admin, job_id) for task, job_id in jobs.items()}


def _client(server: LiveServer, key: str = ALL_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def _expected(tiny_model: Path, server: LiveServer, tokenizer: object, task: str | None, max_tokens: int) -> list[int]:
    """Greedy token ids of the merged-weights reference for MESSAGES (stopping before end of sequence)."""
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    artifact = None
    if task is not None:
        with server.admin() as admin:
            artifact = admin.get(f"/admin/v1/tasks/{task}/artifact").content
    return greedy_reference(tiny_model, artifact, ids, max_tokens)


def _generated(token_ids: list[int], eos: set[int]) -> list[int]:
    """The server's token ids without the end-of-sequence token it reports last."""
    return token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids


def _eos(tiny_model: Path) -> set[int]:
    from server.model.config import ModelConfig

    return set(ModelConfig.from_dir(tiny_model).eos_token_ids)


def test_jobs_compress_and_publish_both_uploads(published: dict[str, dict], server: LiveServer) -> None:
    for _task, job in published.items():
        assert job["state"] == "succeeded", job["error"]
        assert job["version"] == 1 and job["done"] == job["total"] > 0
    with server.admin() as admin:
        tasks = {t["task"]: t for t in admin.get("/admin/v1/tasks").json()["data"]}
    assert set(tasks) == {"math", "code"} and tasks["math"]["ratio"] == 8.0 and tasks["math"]["quality"]


def _assert_absent_or_complete(admin: httpx.Client, task: str) -> None:
    """A task under construction is invisible; once visible (the job publishes just before its state
    flips to succeeded) its artifact is whole: the bytes hash to the sha256 the index records."""
    entry = admin.get(f"/admin/v1/tasks/{task}")
    if entry.status_code == 404:
        return
    assert entry.status_code == 200, entry.text
    artifact = admin.get(f"/admin/v1/tasks/{task}/artifact")
    assert hashlib.sha256(artifact.content).hexdigest() == artifact.headers["X-Artifact-Sha256"]


def test_serving_goes_on_while_a_job_compresses(
    published: dict, server: LiveServer, finetunes: dict[str, Path]
) -> None:
    """Chats sent back to back from another thread while a job runs: some start and end inside the
    job's running window (server-side times, same clock), and the task the job makes is never seen
    half-published."""
    client, spans, done = _client(server), [], threading.Event()

    def chat_until_done() -> None:
        while not done.is_set():
            start = time.time()
            reply = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=1)
            assert reply.choices[0].finish_reason in ("stop", "length")
            spans.append((start, time.time()))

    chatter = threading.Thread(target=chat_until_done, daemon=True)
    chatter.start()
    with server.admin() as admin:
        while len(spans) < 2:
            time.sleep(0.01)
        job = admin.post(
            "/admin/v1/tasks/side/checkpoint",
            params={"ratio": 8, "method": "impart-qt"},
            files=checkpoint_files(finetunes["math"]),
        ).json()
        while (current := admin.get(f"/admin/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
            _assert_absent_or_complete(admin, "side")
        done.set()
        chatter.join(timeout=30)
        assert current["state"] == "succeeded", current["error"]
        inside = [s for s in spans if current["started"] <= s[0] and s[1] <= current["finished"]]
        assert inside, f"no chat completed during the job ({current['finished'] - current['started']:.3f} s)"
        admin.delete("/admin/v1/tasks/side").raise_for_status()


def test_chat_with_x_task_gives_the_merged_models_greedy_tokens(
    published: dict, server: LiveServer, tiny_model: Path, tiny_tokenizer: object
) -> None:
    client, ids = _client(server), {"return_token_ids": True}
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, extra_headers={"X-Task": "math"}, extra_body=ids
    )
    base = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, extra_body=ids)
    expected_math = _expected(tiny_model, server, tiny_tokenizer, "math", 8)
    expected_base = _expected(tiny_model, server, tiny_tokenizer, None, 8)
    assert expected_math != expected_base, "the delta must change the greedy tokens"
    assert _generated(reply.choices[0].token_ids, _eos(tiny_model)) == expected_math and reply.model == "math"
    assert _generated(base.choices[0].token_ids, _eos(tiny_model)) == expected_base


def test_async_and_streaming_clients_agree_on_a_sharded_upload(
    published: dict, server: LiveServer, tiny_model: Path, tiny_tokenizer: object
) -> None:
    expected, eos, ids = (
        _expected(tiny_model, server, tiny_tokenizer, "code", 6),
        _eos(tiny_model),
        {"return_token_ids": True},
    )

    async def ask() -> list[int]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=ALL_KEY, max_retries=0)
        reply = await client.chat.completions.create(
            model="tiny:code", messages=MESSAGES, max_tokens=6, temperature=0, extra_body=ids
        )
        await client.close()
        return reply.choices[0].token_ids

    assert _generated(asyncio.run(ask()), eos) == expected
    stream = _client(server).chat.completions.create(
        model="code",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=ids,
    )
    chunks = list(stream)
    streamed = [t for c in chunks if c.choices for t in (getattr(c.choices[0].delta, "token_ids", None) or [])]
    assert _generated(streamed, eos) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(streamed)


def test_completions_endpoint_serves_a_task(published: dict, server: LiveServer) -> None:
    reply = _client(server).completions.create(model="math", prompt="two plus two is", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 0


def test_api_keys_are_scoped_to_their_tasks(published: dict, server: LiveServer) -> None:
    scoped = _client(server, MATH_KEY)
    assert scoped.chat.completions.create(model="math", messages=MESSAGES, max_tokens=2).choices
    with pytest.raises(openai.PermissionDeniedError):
        scoped.chat.completions.create(model="code", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _client(server, "not-a-key").chat.completions.create(model="math", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        _client(server).chat.completions.create(model="no-such-task", messages=MESSAGES, max_tokens=2)
    assert missing.value.code == "model_not_found"
    assert [m.id for m in scoped.models.list()] == ["tiny", "math"]
    assert httpx.get(f"{server.url}/admin/v1/tasks", headers={"Authorization": f"Bearer {ALL_KEY}"}).status_code == 403


def test_new_version_rollback_and_delete_take_effect(
    published: dict, server: LiveServer, tiny_model: Path, tiny_tokenizer: object
) -> None:
    client = _client(server)

    def math_says() -> str:
        return (
            client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )

    original = math_says()
    with server.admin() as admin:
        code_artifact = admin.get("/admin/v1/tasks/code/artifact").content
        put = admin.put("/admin/v1/tasks/math/artifact", content=code_artifact)
        assert put.status_code == 201 and put.json()["version"] == 2
        code_says = (
            client.chat.completions.create(model="code", messages=MESSAGES, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )
        assert math_says() == code_says != original
        assert admin.post("/admin/v1/tasks/math/rollback", json={"version": 1}).json()["version"] == 1
        assert math_says() == original
        versions = admin.get("/admin/v1/tasks/math/versions").json()
        assert versions["current"] == 1 and [v["version"] for v in versions["data"]] == [1, 2]
        admin.put("/admin/v1/tasks/gone/artifact", content=code_artifact)
        assert admin.delete("/admin/v1/tasks/gone").json()["deleted"]
        assert admin.get("/admin/v1/tasks/gone").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gone", messages=MESSAGES, max_tokens=2)


def test_warm_makes_a_delta_resident(published: dict, server: LiveServer) -> None:
    with server.admin() as admin:
        assert admin.post("/admin/v1/tasks/code/warm").json() == {"task": "code", "resident": True}
        assert "code" in admin.get("/admin/v1/stats").json()["resident_tasks"]
        assert admin.post("/admin/v1/tasks/nope/warm").status_code == 404


def test_client_gone_mid_stream_frees_its_slot(published: dict, server: LiveServer) -> None:
    body = {"model": "math", "messages": MESSAGES, "max_tokens": 400, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {ALL_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as reply:
        lines = reply.iter_lines()
        assert next(next(lines) for _ in range(4)).startswith("data: ")
        with server.admin() as admin:
            assert admin.get("/admin/v1/stats").json()["kv_blocks_used"] > 0
    with server.admin() as admin:
        end = time.monotonic() + 10
        while admin.get("/admin/v1/stats").json()["kv_blocks_used"] and time.monotonic() < end:
            time.sleep(0.05)
        assert admin.get("/admin/v1/stats").json()["kv_blocks_used"] == 0
    with server.admin() as admin:
        metrics = admin.get("/metrics").text
    assert 'deltaserve_task_requests_total{outcome="disconnected",task="math"} 1.0' in metrics
    assert _client(server).chat.completions.create(model="math", messages=MESSAGES, max_tokens=2).choices


def test_metrics_count_per_task_requests_and_job_states(published: dict, server: LiveServer) -> None:
    with server.admin() as admin:
        text = admin.get("/metrics").text
    assert 'deltaserve_completion_tokens_total{task="math"}' in text
    assert 'deltaserve_jobs{state="succeeded"} 3.0' in text
    assert "deltaserve_engine_delta_misses_total" in text


def _bad_upload(kind: str, good: Path, tmp: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """The multipart files of one kind of bad upload, made from a good fine-tune folder."""
    from safetensors.torch import load_file, save_file

    config, weights = (good / "config.json").read_bytes(), (good / "model.safetensors").read_bytes()
    if kind == "pickle":
        return [("file", ("config.json", config)), ("file", ("pytorch_model.bin", b"\x80\x04pickle"))]
    if kind == "shapes":
        tensors = load_file(str(good / "model.safetensors"))
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]
        save_file(tensors, str(tmp / "shapes.safetensors"))
        weights = (tmp / "shapes.safetensors").read_bytes()
    if kind == "architecture":
        config = json.dumps({**json.loads(config), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}).encode()
    if kind == "truncated":
        weights = weights[: len(weights) // 2]
    if kind == "no-config":
        return [("file", ("model.safetensors", weights))]
    if kind == "oversized":
        return [("file", ("config.json", config)), ("file", ("model.safetensors", b"\0" * (UPLOAD_CAP + 1)))]
    return [("file", ("config.json", config)), ("file", ("model.safetensors", weights))]


@pytest.mark.parametrize(
    "kind, status, says",
    [
        ("pickle", 400, "pickle"),
        ("shapes", 400, "shape"),
        ("architecture", 400, "architecture"),
        ("truncated", 400, "checkpoint"),
        ("no-config", 400, "config.json"),
        ("oversized", 413, "exceeds"),
    ],
)
def test_bad_uploads_are_rejected_clearly_and_publish_nothing(
    published: dict, server: LiveServer, finetunes: dict[str, Path], tmp_path: Path, kind: str, status: int, says: str
) -> None:
    with server.admin() as admin:
        jobs_before = len(admin.get("/admin/v1/jobs").json()["data"])
        reply = admin.post("/admin/v1/tasks/bad/checkpoint", files=_bad_upload(kind, finetunes["math"], tmp_path))
        assert reply.status_code == status, reply.text
        assert says in reply.json()["error"]["message"].lower()
        assert admin.get("/admin/v1/tasks/bad").status_code == 404
        assert len(admin.get("/admin/v1/jobs").json()["data"]) == jobs_before
    assert list((server.work_dir / "uploads").iterdir()) == []


def test_a_task_name_that_escapes_is_rejected(published: dict, server: LiveServer, finetunes: dict[str, Path]) -> None:
    with server.admin() as admin:
        reply = admin.post("/admin/v1/tasks/..%2Fx/checkpoint", files=checkpoint_files(finetunes["math"]))
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "task"
        assert admin.put("/admin/v1/tasks/..%2Fx/artifact", content=b"x").status_code == 400
        assert "../x" not in [t["task"] for t in admin.get("/admin/v1/tasks").json()["data"]]


def test_a_corrupt_artifact_upload_is_rejected(published: dict, server: LiveServer) -> None:
    with server.admin() as admin:
        good = admin.get("/admin/v1/tasks/math/artifact").content
        reply = admin.put("/admin/v1/tasks/broken/artifact", content=good[:-100])
        assert reply.status_code == 400 and "artifact" in reply.json()["error"]["message"].lower()
        assert admin.get("/admin/v1/tasks/broken").status_code == 404


def test_sigterm_drains_streams_then_aborts_them_and_exits(published: dict, server: LiveServer) -> None:
    """Runs last: stops the module's server. A stream longer than the shutdown timeout ends with
    finish_reason "abort" and [DONE]; new connections are refused; the process exits cleanly."""
    body = {"model": "math", "messages": MESSAGES, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {ALL_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        next(lines)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finishes = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1] if json.loads(e)["choices"]]
    assert finishes[-1] == "abort"
    assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S + 10
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM), "uvicorn re-raises the signal once shut down"
    assert "Application shutdown complete" in server.log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
