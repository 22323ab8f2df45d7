"""Two server processes on one Redis see each other's tasks, jobs, new versions, rollbacks and deletions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from live import ADMIN_KEY, LiveServer, checkpoint_files, redis_replicas, wait_job

from tests.waiting import eventually

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture()
def replicas(redis_url: str, tiny_model: Path, tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    with redis_replicas(tiny_model, tmp_path, redis_url) as pair:
        yield pair


def _say(server: LiveServer, task: str) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    return (
        client.chat.completions.create(model=task, messages=MESSAGES, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )


def test_replicas_share_tasks_versions_and_deletions(
    replicas: tuple[LiveServer, LiveServer], finetunes: dict[str, Path]
) -> None:
    first, second = replicas
    with first.admin() as admin, second.admin() as other:
        for task in ("math", "code"):
            job = admin.post(
                f"/admin/v1/tasks/{task}/checkpoint", params={"ratio": 8}, files=checkpoint_files(finetunes[task])
            ).json()
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
        assert eventually(lambda: _say(second, "math") == code_says, 5.0) is not None, (
            "second replica kept the old delta"
        )
        admin.post("/admin/v1/tasks/math/rollback", json={"version": 1}).raise_for_status()
        assert eventually(lambda: _say(second, "math") == math_v1, 5.0) is not None, (
            "second replica missed the rollback"
        )
        admin.delete("/admin/v1/tasks/code").raise_for_status()

    def second_lost_code() -> bool:
        try:
            _say(second, "code")
        except openai.NotFoundError:
            return True
        return False

    assert eventually(second_lost_code, 5.0) is not None
