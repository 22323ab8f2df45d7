"""The README's run command on the embedded default: no keys, local-disk registry, no Redis. The server
answers /health, lists its base in /v1/models, and the official client chats with the base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from live import LiveServer, start_server


@pytest.fixture()
def keyless(tiny_model: Path, tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server(tiny_model, tmp_path, DELTASERVE_ADMIN_KEYS="", DELTASERVE_API_KEYS="")
    yield server
    server.stop()


def test_keyless_default_serves_the_base_on_localhost(keyless: LiveServer) -> None:
    assert httpx.get(f"{keyless.url}/health").json() == {"status": "ok"}
    assert [card["id"] for card in httpx.get(f"{keyless.url}/v1/models").json()["data"]] == ["tiny"]
    client = openai.OpenAI(base_url=f"{keyless.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens >= 1
    assert "serving on localhost only" in keyless.log.read_text()
