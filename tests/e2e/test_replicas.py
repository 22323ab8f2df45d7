"""Two server processes on one Redis see each other's tasks, jobs, new versions, rollbacks and deletions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from live import ADMIN_KEY, LiveServer, checkpoint_files, launch_server, wait_job, wait_ready

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture()
def replicas(redis_url: str, tiny_model: Path, tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    env = {"DELTASERVE_REGISTRY": "redis", "DELTASERVE_REDIS_URL": redis_url}
    first, second = launch_server(tiny_model, tmp_path / "a", **env), launch_server(tiny_model, tmp_path / "b", **env)
    try:
        wait_ready(first)
        wait_ready(second)
        yield first, second
    finally:
        first.stop()
        second.stop()


def _say(server: LiveServer, task: str) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    return client.chat.completions.create(model=task, messages=MESSAGES, max_tokens=8,
                                          temperature=0).choices[0].message.content


def _eventually(check: Callable[[], bool], deadline_s: float = 5.0) -> bool:
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_replicas_share_tasks_versions_and_deletions(replicas: tuple[LiveServer, LiveServer],
                                                     finetunes: dict[str, Path]) -> None:
    first, second = replicas
    with first.admin() as admin, second.admin() as other:
        for task in ("math", "code"):
            job = admin.post(f"/admin/v1/tasks/{task}/checkpoint", params={"ratio": 8},
                             files=checkpoint_files(finetunes[task])).json()
            # behind the gateway the polls of a job reach any replica: the second one answers too
            done = wait_job(other, job["id"])
            assert done["state"] == "succeeded" and done["replica"] == wait_job(admin, job["id"])["replica"]
        assert {"math", "code"} <= {j["task"] for j in other.get("/admin/v1/jobs").json()["data"]}
    listed = openai.OpenAI(base_url=f"{second.url}/v1", api_key=ADMIN_KEY).models.list()
    assert {"math", "code"} <= {m.id for m in listed}
    math_v1 = _say(first, "math")
    assert _say(second, "math") == math_v1 != _say(second, "tiny")

    with first.admin() as admin:
        code = admin.get("/admin/v1/tasks/code/artifact").content
        assert admin.put("/admin/v1/tasks/math/artifact", content=code).json()["version"] == 2
        code_says = _say(first, "code")
        assert _eventually(lambda: _say(second, "math") == code_says), "second replica kept the old delta"
        admin.post("/admin/v1/tasks/math/rollback", json={"version": 1}).raise_for_status()
        assert _eventually(lambda: _say(second, "math") == math_v1), "second replica missed the rollback"
        admin.delete("/admin/v1/tasks/code").raise_for_status()

    def second_lost_code() -> bool:
        try:
            _say(second, "code")
        except openai.NotFoundError:
            return True
        return False

    assert _eventually(second_lost_code)
