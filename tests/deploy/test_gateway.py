"""The task-affinity gateway: nginx + njs from deploy/gateway, driven live against stand-in replicas.

Stand-in replicas are tiny HTTP servers on loopback that answer with their own port, so each test
sees which replica the gateway chose. nginx comes from Debian (`nginx-light libnginx-mod-http-js`);
the static checks at the bottom need no nginx.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.deploy.conftest import GATEWAY, GATEWAY_VAR, render_gateway_template

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
JS_MODULE_DIRS = [Path("/usr/lib/nginx/modules"), Path("/usr/share/nginx/modules"), Path("/etc/nginx/modules")]
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx not installed: apt-get install nginx-light libnginx-mod-http-js"
)


class Replica(BaseHTTPRequestHandler):
    """Answers every request with its server's port; answers 503 while the server is `draining`."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status = 503 if getattr(self.server, "draining", False) else 200
        body = json.dumps({"replica": self.server.server_address[1]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_replica() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Replica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _js_module_dir() -> Path:
    found = next((d for d in JS_MODULE_DIRS if (d / "ngx_http_js_module.so").is_file()), None)
    if found is None:
        pytest.fail("nginx is installed without its njs module: apt-get install libnginx-mod-http-js")
    return found


def _write_prefix(prefix: Path, port: int, replicas: list[int]) -> None:
    """Lay out an nginx prefix like the image's /etc/nginx: nginx.conf, njs/, rendered conf.d/."""
    shutil.copy(GATEWAY / "nginx.conf", prefix / "nginx.conf")
    shutil.copytree(GATEWAY / "njs", prefix / "njs")
    (prefix / "modules").symlink_to(_js_module_dir())
    servers = " ".join(f"server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in replicas)
    values = {"GATEWAY_PORT": str(port), "GATEWAY_RESOLVER": "127.0.0.1", "GATEWAY_BASE_MODEL": "smollm2",
              "GATEWAY_UPSTREAM_SERVERS": servers}
    (prefix / "conf.d").mkdir()
    for template in (GATEWAY / "templates").glob("*.template"):
        rendered = render_gateway_template(template.read_text(), values)
        (prefix / "conf.d" / template.name.removesuffix(".template")).write_text(rendered)


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail("nginx did not start listening")


class Gateway:
    def __init__(self, port: int, replicas: list[ThreadingHTTPServer]) -> None:
        self.port = port
        self.replicas = replicas

    def route(self, task: str | None = None, model: str | None = None) -> int:
        """Send one chat request; the port of the replica that answered it."""
        body = json.dumps({"model": model, "messages": []} if model is not None else {}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        if task is not None:
            request.add_header("X-Task", task)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["replica"]


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    replicas = [_start_replica() for _ in range(3)]
    port = _free_port()
    _write_prefix(tmp_path, port, [r.server_address[1] for r in replicas])
    proc = subprocess.Popen([NGINX, "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, proc)
        yield Gateway(port, replicas)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for replica in replicas:
            replica.shutdown()
            replica.server_close()


TASKS = [f"task-{i}" for i in range(24)]


@needs_nginx
def test_one_task_always_lands_on_one_replica_and_tasks_spread(gateway: Gateway) -> None:
    owners = {task: gateway.route(task=task) for task in TASKS}
    assert all(gateway.route(task=task) == owner for task, owner in owners.items())
    assert len(set(owners.values())) == 3, "24 tasks should hash onto all three replicas"


@needs_nginx
def test_model_field_routes_like_the_x_task_header(gateway: Gateway) -> None:
    for task in TASKS[:8]:
        owner = gateway.route(task=task)
        assert gateway.route(model=task) == owner
        assert gateway.route(model=f"smollm2:{task}") == owner


@needs_nginx
def test_x_task_header_wins_over_the_model_field(gateway: Gateway) -> None:
    owners = {task: gateway.route(task=task) for task in TASKS}
    a, b = next((a, b) for a in TASKS for b in TASKS if owners[a] != owners[b])
    assert gateway.route(task=a, model=b) == owners[a]


@needs_nginx
def test_base_only_requests_spread_over_replicas(gateway: Gateway) -> None:
    seen = {gateway.route(model="smollm2") for _ in range(30)} | {gateway.route() for _ in range(30)}
    assert len(seen) >= 2, "requests naming no task must not all pile onto one replica"


@needs_nginx
def test_down_replica_moves_only_its_own_tasks(gateway: Gateway) -> None:
    owners = {task: gateway.route(task=task) for task in TASKS}
    down = gateway.replicas[0]
    down_port = down.server_address[1]
    down.shutdown()
    down.server_close()
    after = {task: gateway.route(task=task) for task in TASKS}
    assert down_port not in after.values()
    assert all(after[t] == owners[t] for t in TASKS if owners[t] != down_port), "tasks of live replicas moved"
    moved = {after[t] for t in TASKS if owners[t] == down_port}
    assert moved and all(after[t] == gateway.route(task=t) for t in TASKS), "fallback must be sticky too"


@needs_nginx
def test_replica_answering_503_hands_its_tasks_to_another(gateway: Gateway) -> None:
    owners = {task: gateway.route(task=task) for task in TASKS}
    draining = gateway.replicas[1]
    draining.draining = True
    port = draining.server_address[1]
    for task in (t for t in TASKS if owners[t] == port):
        assert gateway.route(task=task) != port


def _post(gateway: Gateway, path: str, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}{path}", data=body,
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


@needs_nginx
def test_bodies_too_large_to_read_still_reach_a_replica(gateway: Gateway) -> None:
    big = b"{" + b" " * (3 << 20) + b"}"
    assert _post(gateway, "/admin/tasks/t/upload", big) == 200
    assert _post(gateway, "/v1/chat/completions", big) == 200


@needs_nginx
def test_gateway_answers_its_own_health_path(gateway: Gateway) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/gateway/health", timeout=5) as response:
        assert response.status == 200


def test_templates_use_only_the_documented_gateway_variables() -> None:
    template = (GATEWAY / "templates" / "deltaserve.conf.template").read_text()
    header = "\n".join(line for line in template.splitlines() if line.startswith("#"))
    used = {m for t in (GATEWAY / "templates").glob("*.template") for m in GATEWAY_VAR.findall(t.read_text())}
    assert used == {"GATEWAY_PORT", "GATEWAY_RESOLVER", "GATEWAY_BASE_MODEL", "GATEWAY_UPSTREAM_SERVERS"}
    assert all(name in header for name in used), "every variable is documented in the template header"


def test_upstream_hashes_the_task_key_consistently() -> None:
    conf = (GATEWAY / "templates" / "deltaserve.conf.template").read_text()
    assert "hash $deltaserve_task consistent;" in conf
    main = (GATEWAY / "nginx.conf").read_text()
    assert "js_set $deltaserve_task deltaserve.taskKey;" in main
    assert "include conf.d/deltaserve.conf;" in main
