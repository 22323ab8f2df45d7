"""LoRA tasks across two live server processes on one Redis registry: an adapter uploaded to one replica
is served by the other exactly as peft's merged model, listed by both, rolled back and deleted like any task."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from live import ADMIN_KEY, LiveServer, redis_replicas

from tests.compressor.peft_adapters import RICH, peft_merged, write_adapter
from tests.engine.conftest import hf_greedy
from tests.waiting import eventually

PROMPT = [11, 23, 5, 77, 140, 9, 31]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture()
def replicas(redis_url: str, tiny_model: Path, tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    with redis_replicas(tiny_model, tmp_path, redis_url) as pair:
        yield pair


def _logprobs(server: LiveServer, task: str) -> torch.Tensor:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    reply = client.completions.create(
        model=task, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    return torch.tensor(reply.choices[0].logprobs.token_logprobs)


def _expected(base: Path, adapter: Path) -> torch.Tensor:
    tokens, logits = hf_greedy(peft_merged(base, adapter), PROMPT, 6)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_a_lora_task_uploaded_to_one_replica_serves_exactly_on_the_other(
    replicas: tuple[LiveServer, LiveServer], tiny_model: Path, tmp_path: Path
) -> None:
    first, second = replicas
    adapters = [
        write_adapter(tiny_model, tmp_path / "rich", seed=31, **RICH),
        write_adapter(tiny_model, tmp_path / "plain", seed=32, r=2, lora_alpha=2, target_modules=["v_proj"]),
    ]
    with first.admin() as admin, second.admin() as other:
        for version, adapter in enumerate(adapters, start=1):
            files = [("file", (name, (adapter / name).read_bytes())) for name in FILES]
            reply = admin.post("/admin/v1/tasks/tenant-lora/adapter", files=files)
            assert reply.status_code == 201 and reply.json()["version"] == version, reply.text
        assert eventually(lambda: other.get("/admin/v1/tasks/tenant-lora").json().get("current") == 2, 10)
        assert (_logprobs(second, "tenant-lora") - _expected(tiny_model, adapters[1])).abs().max() < 1e-4
        assert other.post("/admin/v1/tasks/tenant-lora/rollback", json={"version": 1}).status_code == 200
        assert eventually(lambda: admin.get("/admin/v1/tasks/tenant-lora").json().get("current") == 1, 10)
        assert (_logprobs(first, "tenant-lora") - _expected(tiny_model, adapters[0])).abs().max() < 1e-4
        assert "tenant-lora" in {m["id"] for m in other.get("/v1/models").json()["data"]}
        assert admin.get("/admin/v1/tasks/tenant-lora").json()["method"] == "lora"
        assert other.delete("/admin/v1/tasks/tenant-lora").status_code == 200
        assert eventually(lambda: admin.get("/admin/v1/tasks/tenant-lora").status_code == 404, 10)
