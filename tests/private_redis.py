"""A private redis-server for fault tests: started in a tmp folder on a free port (AOF on, fsync always),
killed, restarted on the same port and data, stopped (SIGSTOP) and resumed; always ended by the test."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

START_DEADLINE_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.paused = False
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart after kill) on the same port and folder; returns once it answers PING."""
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        log = (self.folder / "redis.log").open("a")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError as exc:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = (self.folder / "redis.log").read_text()
                    raise AssertionError(f"redis-server did not start:\n{log}") from exc
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL: the server vanishes at once (connections reset, nothing flushed beyond the AOF)."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections open, nothing answered) until resume()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def close(self) -> None:
        self.kill()
