"""POST /admin/v1/tasks/{task}/adapter over real TCP: a PEFT adapter becomes a task (method lora) that the
official openai client is served from exactly as peft's merged model; versions and rollback as any task;
refusals are 400s in OpenAI shape naming the field, and nothing is published or left behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from live_app import ADMIN_KEY, keyed_app, serving

from tests.compressor.peft_adapters import RICH, peft_merged, write_adapter
from tests.engine.conftest import hf_greedy

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT = [5, 17, 42, 99, 7, 230]


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "rich": write_adapter(tiny_model, root / "rich", seed=21, **RICH),
        "plain": write_adapter(
            tiny_model, root / "plain", seed=22, r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"]
        ),
    }


@pytest.fixture(scope="module")
def live(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("lora-live")
    with serving(keyed_app(tiny_model, work)) as url:
        yield url, work


@pytest.fixture()
def client(live: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live[0], headers=ADMIN, timeout=120) as admin:
        yield admin


def _upload(
    client: httpx.Client, task: str, folder: Path, query: str = "", names: tuple[str, ...] = FILES
) -> httpx.Response:
    files = [("file", (name, (folder / name).read_bytes())) for name in names]
    return client.post(f"/admin/v1/tasks/{task}/adapter{query}", files=files)


def _error(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_an_uploaded_adapter_serves_like_peft_merged_and_versions_roll_back(
    client: httpx.Client, live: tuple[str, Path], tiny_model: Path, adapters: dict[str, Path]
) -> None:
    first = _upload(client, "lora-a", adapters["rich"])
    assert first.status_code == 201, first.text
    assert first.json()["method"] == "lora" and first.json()["version"] == 1 and first.json()["ratio"] is None
    openai_client = openai.OpenAI(base_url=f"{live[0]}/v1", api_key=ADMIN_KEY, max_retries=0)
    for version, name in ((1, "rich"), (2, "plain"), (1, "rich")):
        if version == 2:
            assert _upload(client, "lora-a", adapters[name]).json()["version"] == 2
        elif client.get("/admin/v1/tasks/lora-a").json()["current"] == 2:
            assert client.post("/admin/v1/tasks/lora-a/rollback", json={"version": 1}).status_code == 200
        reply = openai_client.completions.create(
            model="lora-a", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
        )
        tokens, logits = hf_greedy(peft_merged(tiny_model, adapters[name]), PROMPT, 8)
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        ours = torch.tensor(reply.choices[0].logprobs.token_logprobs)
        assert (ours - expected).abs().max() < 1e-4, (version, name)
    task = client.get("/admin/v1/tasks/lora-a").json()
    assert task["method"] == "lora" and [v["source"] for v in task["versions"]] == ["adapter", "adapter"]


def test_ratio_compresses_the_uploaded_adapter(client: httpx.Client, adapters: dict[str, Path]) -> None:
    reply = _upload(client, "lora-small", adapters["plain"], "?ratio=8&method=lowrank")
    assert reply.status_code == 201, reply.text
    assert reply.json()["method"] == "lora" and reply.json()["ratio"] == 8
    assert _error(_upload(client, "lora-small", adapters["plain"], "?ratio=8&method=dare"), 400)["param"] == "method"


def _edited(adapter: Path, tmp: Path, config: object = None, text: str | None = None) -> Path:
    folder = tmp / "edited"
    shutil.copytree(adapter, folder)
    if config is not None or text is not None:
        raw = json.loads((folder / FILES[0]).read_text())
        (folder / FILES[0]).write_text(text if text is not None else json.dumps({**raw, **config}))  # type: ignore[dict-item]
    return folder


@pytest.mark.parametrize(
    ("config", "text", "param"),
    [
        ({"use_dora": True}, None, "use_dora"),
        ({"bias": "all"}, None, "bias"),
        ({"r": [4]}, None, "r"),
        ({"target_modules": {"q": 1}}, None, "target_modules"),
        (None, "[1, 2]", "adapter_config.json"),
        (None, "not json", "adapter_config.json"),
        ({"rank_pattern": {"v_proj": 9}}, None, "rank_pattern"),
    ],
)
def test_a_refused_config_is_a_400_naming_the_field_and_publishes_nothing(
    client: httpx.Client,
    live: tuple[str, Path],
    adapters: dict[str, Path],
    tmp_path: Path,
    config: dict | None,
    text: str | None,
    param: str,
) -> None:
    error = _error(_upload(client, "lora-refused", _edited(adapters["rich"], tmp_path, config, text)), 400)
    assert error["param"] == param
    assert client.get("/admin/v1/tasks/lora-refused").status_code == 404
    assert not any((live[1] / "work" / "uploads").iterdir())


def test_weights_the_base_cannot_take_are_400s(client: httpx.Client, adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _edited(adapters["plain"], tmp_path)
    weights = load_file(str(folder / FILES[1]))
    save_file(
        {k.replace("layers.0.mlp.up_proj", "layers.0.mlp.w9"): v for k, v in weights.items()}, str(folder / FILES[1])
    )
    assert _error(_upload(client, "lora-refused", folder), 400)["param"] == "target_modules"
    save_file(
        {k: v[:, :3].contiguous() if k.endswith("lora_A.weight") else v for k, v in weights.items()},
        str(folder / FILES[1]),
    )
    assert _error(_upload(client, "lora-refused", folder), 400)["param"] == FILES[1]
    (folder / FILES[1]).write_bytes(b"\x00" * 64)
    assert _error(_upload(client, "lora-refused", folder), 400)["param"] == FILES[1]
    assert client.get("/admin/v1/tasks/lora-refused").status_code == 404


def test_pickled_or_missing_files_are_400s(client: httpx.Client, adapters: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited(adapters["plain"], tmp_path)
    shutil.copy(folder / FILES[1], folder / "adapter_model.bin")
    error = _error(_upload(client, "lora-refused", folder, names=(FILES[0], "adapter_model.bin")), 400)
    assert error["param"] == "file" and "pickle" in error["message"]
    assert _error(_upload(client, "lora-refused", folder, names=(FILES[0],)), 400)["param"] == FILES[1]
    assert _error(_upload(client, "lora-refused", folder, names=(FILES[1],)), 400)["param"] == FILES[0]
    assert _error(client.post("/admin/v1/tasks/lora-refused/adapter", content=b"{}"), 400)["param"] == "file"
