"""The compression worker does not outlive a server that was killed outright."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
SERVER = """
import time
from concurrent.futures import ProcessPoolExecutor
from server.jobs.worker import init_worker, spawn_context
if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=spawn_context(), initializer=init_worker, initargs=(None,))
    pool.submit(time.sleep, 120).add_done_callback(lambda f: None)
    while not pool._processes:
        time.sleep(0.05)
    time.sleep(1.0)
    print(next(iter(pool._processes)), flush=True)
    time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_exits_when_its_server_is_killed() -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(server.stdout.readline())
        assert not _gone(worker), "the worker is busy compressing (sleeping) while the server lives"
        server.kill()
        server.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker), "the worker outlived its killed server"
    finally:
        server.kill()
