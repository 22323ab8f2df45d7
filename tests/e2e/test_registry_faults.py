"""Redis faults against two live replicas sharing a private redis-server (AOF on) that the test starts,
kills, restarts, stops and resumes. Each test asserts that the version served is the version published
and that tenants the fault does not concern keep being served."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from live import ADMIN_KEY, LiveServer, checkpoint_files, greedy_reference, launch_server, wait_ready

from tests.private_redis import PrivateRedis
from tests.waiting import eventually

MESSAGES = [{"role": "user", "content": "Say something."}]
MAX_TOKENS = 6
TIMEOUT_S = 1.0
"""DELTASERVE_REGISTRY_TIMEOUT of the replicas: what a Redis call may cost at most."""
RESYNC_S = 0.5
SWITCH_GOAL_S = 2.0


@pytest.fixture(scope="module")
def artifacts(
    tiny_model: Path, finetunes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    """ImPart artifacts of both fine-tunes: "v1" (math) and "v2" (code), two versions to publish."""
    from compressor import compress

    root = tmp_path_factory.mktemp("fault-artifacts")
    for name, task in (("v1", "math"), ("v2", "code")):
        compress(tiny_model, finetunes[task], root / f"{name}.safetensors", method="impart", ratio=8.0, seed=0)
    return {name: (root / f"{name}.safetensors").read_bytes() for name in ("v1", "v2")}


@pytest.fixture(scope="module")
def expected(tiny_model: Path, tiny_tokenizer: object, artifacts: dict[str, bytes]) -> dict[str, list[int]]:
    """Greedy tokens of the merged-weights reference: for each version, and for the base alone."""
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tiny_tokenizer.encode(prompt, add_special_tokens=False)
    found = {name: greedy_reference(tiny_model, data, ids, MAX_TOKENS) for name, data in artifacts.items()}
    found["base"] = greedy_reference(tiny_model, None, ids, MAX_TOKENS)
    assert len({tuple(tokens) for tokens in found.values()}) == 3, "the versions must be told apart"
    return found


@pytest.fixture(scope="module")
def cluster(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrivateRedis, list[LiveServer]]]:
    root = tmp_path_factory.mktemp("faults")
    redis_server = PrivateRedis(root / "redis")
    redis_server.start()
    env = {
        "DELTASERVE_REGISTRY": "redis",
        "DELTASERVE_REDIS_URL": redis_server.url,
        "DELTASERVE_TORCH_THREADS": "1",
        "DELTASERVE_REGISTRY_TIMEOUT": str(TIMEOUT_S),
        "DELTASERVE_REGISTRY_RESYNC_S": str(RESYNC_S),
    }
    replicas = [launch_server(tiny_model, root / name, **env) for name in ("a", "b")]
    try:
        for replica in replicas:
            wait_ready(replica)
        yield redis_server, replicas
    finally:
        for replica in replicas:
            replica.stop()
        redis_server.close()


def _chat(server: LiveServer, task: str) -> list[int]:
    """The greedy tokens `task` gets on `server` (without a closing end-of-sequence token)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    reply = client.chat.completions.create(
        model=task, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True}
    )
    return list(reply.choices[0].token_ids)


def _served(server: LiveServer, task: str, expected: dict[str, list[int]]) -> str:
    """Which version (`v1`, `v2`, `base`) `task` is served as; fails on tokens of no published version."""
    tokens = _chat(server, task)
    for name, reference in expected.items():
        if tokens == reference or (len(tokens) == len(reference) + 1 and tokens[:-1] == reference):  # + EOS
            return name
    raise AssertionError(f"{server.url} served {task} as tokens {tokens} of no published version")


def _publish(server: LiveServer, task: str, data: bytes) -> httpx.Response:
    with server.admin() as admin:
        return admin.put(f"/admin/v1/tasks/{task}/artifact", content=data)


def _ask_unknown(admin: httpx.Client) -> httpx.Response:
    """A chat request for a task that was never published: 404 when the registry answers, 503 when not."""
    return admin.post("/v1/chat/completions", json={"model": "never-published", "messages": MESSAGES, "max_tokens": 2})


def _assert_registry_unavailable(reply: httpx.Response) -> None:
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "registry_unavailable" and error["type"] == "service_unavailable"
    assert reply.headers["Retry-After"] == "1"


def test_after_a_redis_kill_and_restart_a_republished_version_is_served_on_every_replica(
    cluster: tuple[PrivateRedis, list[LiveServer]], artifacts: dict[str, bytes], expected: dict[str, list[int]]
) -> None:
    redis_server, replicas = cluster
    assert _publish(replicas[0], "flip", artifacts["v1"]).status_code == 201
    for replica in replicas:
        assert eventually(lambda r=replica: _served(r, "flip", expected) == "v1", 10.0) is not None
    redis_server.kill()
    time.sleep(1.0)  # the replicas' event listeners lose their connection
    redis_server.start()
    published = _publish(replicas[0], "flip", artifacts["v2"])
    assert published.status_code == 201 and published.json()["version"] == 2
    started = time.monotonic()
    with ThreadPoolExecutor(len(replicas)) as pool:
        waits = list(pool.map(lambda r: eventually(lambda: _served(r, "flip", expected) == "v2", 10.0), replicas))
    print(
        f"\nre-publish after a Redis kill/restart -> v2 served: {[round(w, 3) for w in waits if w]} s "
        f"(total {time.monotonic() - started:.3f} s)"
    )
    assert all(w is not None and w <= SWITCH_GOAL_S for w in waits), waits
    for replica in replicas:
        assert [_served(replica, "flip", expected) for _ in range(3)] == ["v2"] * 3


def test_while_redis_is_down_known_tasks_and_the_base_serve_and_unknowns_get_503(
    cluster: tuple[PrivateRedis, list[LiveServer]],
    artifacts: dict[str, bytes],
    expected: dict[str, list[int]],
    finetunes: dict[str, Path],
) -> None:
    redis_server, replicas = cluster
    assert _publish(replicas[0], "steady", artifacts["v1"]).status_code == 201
    for replica in replicas:
        assert eventually(lambda r=replica: _served(r, "steady", expected) == "v1", 10.0) is not None
    redis_server.kill()
    try:
        calls = [(replica, task) for replica in replicas for task in ("steady", "tiny")] * 6
        want = {"steady": "v1", "tiny": "base"}
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda call: _outcome(call[0], call[1], expected), calls))
        errors = [o for o, (_, task) in zip(outcomes, calls) if o != want[task]]
        print(
            f"\nRedis down: {len(calls)} concurrent requests in {time.monotonic() - started:.2f} s, "
            f"{len(errors)} errors"
        )
        assert errors == []
        with replicas[1].admin() as admin:
            _assert_registry_unavailable(_ask_unknown(admin))
            _assert_registry_unavailable(admin.put("/admin/v1/tasks/steady/artifact", content=artifacts["v2"]))
            _assert_registry_unavailable(
                admin.post("/admin/v1/tasks/new/checkpoint", files=checkpoint_files(finetunes["math"]))
            )
            assert "steady" in {m["id"] for m in admin.get("/v1/models").json()["data"]}
            listed = admin.get("/admin/v1/tasks").json()["data"]
            assert "steady" in {t["task"] for t in listed}
            assert _gauge(admin, "deltaserve_registry_reachable") == 0.0
            assert _gauge(admin, "deltaserve_registry_known_tasks") == len(listed)
    finally:
        redis_server.start()
    with replicas[1].admin() as admin:
        assert eventually(lambda: _ask_unknown(admin).status_code == 404, 5.0) is not None
        assert eventually(lambda: _gauge(admin, "deltaserve_registry_reachable") == 1.0, 5.0) is not None
    assert _publish(replicas[1], "steady", artifacts["v2"]).status_code == 201
    for replica in replicas:
        assert eventually(lambda r=replica: _served(r, "steady", expected) == "v2", SWITCH_GOAL_S) is not None


def _gauge(admin: httpx.Client, name: str) -> float:
    """The value of an unlabelled gauge in /metrics (the admin key may read it)."""
    for line in admin.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _outcome(server: LiveServer, task: str, expected: dict[str, list[int]]) -> str:
    try:
        return _served(server, task, expected)
    except (openai.APIError, httpx.HTTPError, AssertionError) as exc:
        return f"error: {type(exc).__name__}: {exc}"


def test_a_hung_redis_costs_a_resident_task_nothing_and_an_unknown_one_at_most_the_timeout(
    cluster: tuple[PrivateRedis, list[LiveServer]], artifacts: dict[str, bytes], expected: dict[str, list[int]]
) -> None:
    redis_server, replicas = cluster
    server = replicas[0]
    assert _publish(server, "hung", artifacts["v1"]).status_code == 201
    assert _served(server, "hung", expected) == "v1"
    baseline = min(_timed(lambda: _served(server, "hung", expected)) for _ in range(3))
    redis_server.pause()
    try:
        # each request would wait at least the timeout if it touched the hung Redis; the fastest of two
        # keeps the shared CPU's noise out of the comparison
        during = min(
            _timed(lambda: _served(server, "hung", expected) == "v1" or pytest.fail("wrong version")) for _ in range(2)
        )
        with server.admin() as admin:
            unknown = _timed(lambda: _assert_registry_unavailable(_ask_unknown(admin)))
        print(
            f"\nRedis stopped: resident task {during:.3f} s (baseline {baseline:.3f} s), unknown task "
            f"503 in {unknown:.3f} s"
        )
        assert during < baseline + TIMEOUT_S / 2, "a resident task waited on the hung Redis"
        assert unknown < TIMEOUT_S + 1.0
    finally:
        redis_server.resume()
    with server.admin() as admin:
        assert eventually(lambda: _ask_unknown(admin).status_code == 404, 5.0) is not None
    assert _publish(server, "hung", artifacts["v2"]).status_code == 201
    assert _served(server, "hung", expected) == "v2"


def _timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started
