"""An ASGI app served by uvicorn on a free loopback port, in a thread of the test process: real TCP
(keep-alive, resets and chunked bodies are observable) while the app's objects stay reachable."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from bench.load import free_port
from server.app import create_app
from server.config import load_settings

ADMIN_KEY, API_KEY = "admin-key", "api-key"
START_DEADLINE_S = 120.0


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """The app's URL while uvicorn serves it (lifespan included); stopped afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_DEADLINE_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def keyed_app(base: Path, tmp: Path, **overrides: Any) -> Any:
    """The real app on `base` with an admin key and an API key limited to the task `fuzz-task`."""
    settings = load_settings(
        base_model=str(base),
        registry_dir=tmp / "reg",
        work_dir=tmp / "work",
        kv_cache_bytes=8 << 20,
        admin_keys=ADMIN_KEY,
        api_keys={API_KEY: ["fuzz-task"]},
        **overrides,
    )
    return create_app(settings)
