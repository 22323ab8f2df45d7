"""`deltaserve serve` as the README runs it: a live process that answers /health and lists its base."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {deadline_s}s")


@pytest.fixture()
def served_tiny(tiny_model: Path, tmp_path: Path) -> str:
    port = _free_port()
    env = os.environ | {
        "DELTASERVE_BASE_MODEL": str(tiny_model),
        "DELTASERVE_REGISTRY_DIR": str(tmp_path / "registry"),
        "DELTASERVE_WORK_DIR": str(tmp_path / "work"),
        "DELTASERVE_PORT": str(port),
        "DELTASERVE_HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, deadline_s=120)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_answers_health_and_lists_the_base(served_tiny: str) -> None:
    assert httpx.get(f"{served_tiny}/health").status_code == 200
    models = httpx.get(f"{served_tiny}/v1/models").json()
    assert models["object"] == "list"
    assert "tiny" in [card["id"] for card in models["data"]]
