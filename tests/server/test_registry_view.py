"""The registry's view of its index: resolution from memory, read-through with a bounded wait, resync,
reconnection, and never an older answer over a newer one. Redis faults use a private redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.registry import Registry, RegistryUnavailableError, TaskEntry
from server.registry.local import LocalStore
from server.registry.redis_store import RedisStore
from tests.private_redis import PrivateRedis
from tests.waiting import eventually

TIMEOUT_S = 0.5


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.close()


def redis_registry(url: str, resync_s: float = 0.2) -> Registry:
    return Registry(RedisStore(url, timeout_s=TIMEOUT_S), resync_s=resync_s)


def test_known_tasks_resolve_from_memory_while_redis_is_down(private_redis: PrivateRedis) -> None:
    registry = redis_registry(private_redis.url)
    try:
        published = registry.publish("known", b"v1", method="impart", ratio=8.0)
        assert registry.lookup("known").sha256 == published.sha256 and len(registry.tasks()) == 1
        private_redis.kill()
        assert registry.lookup("known").sha256 == published.sha256
        assert [ref.task for ref in registry.tasks()] == ["known"]
        with pytest.raises(RegistryUnavailableError):
            registry.lookup("unknown")
        with pytest.raises(RegistryUnavailableError):
            registry.publish("known", b"v2", method="impart", ratio=8.0)
        with pytest.raises(RegistryUnavailableError):
            registry.read(registry.lookup("known"))
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError):
            registry.lookup("unknown-too")  # known unreachable: refused at once, no new attempt
        assert time.monotonic() - started < 0.05
        private_redis.start()
        assert eventually(lambda: registry.view.reachable, 5 * registry.view.resync_s) is not None
        assert registry.lookup("unknown") is None
        assert registry.read(registry.lookup("known")) == b"v1"  # the AOF kept it
        assert registry.publish("known", b"v2", method="impart", ratio=8.0).version == 2
        assert registry.lookup("known").version == 2
    finally:
        registry.close()


def test_a_hung_redis_costs_an_unknown_task_at_most_the_timeout(private_redis: PrivateRedis) -> None:
    registry = redis_registry(private_redis.url)
    try:
        registry.publish("known", b"v1", method="impart", ratio=8.0)
        registry.start()
        private_redis.pause()
        started = time.monotonic()
        assert registry.lookup("known").version == 1
        assert time.monotonic() - started < 0.05
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError):
            registry.lookup("other")
        assert time.monotonic() - started < TIMEOUT_S + 0.5
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError):
            registry.lookup("another")
        assert time.monotonic() - started < 0.05, "a second unknown name waited on the hung Redis again"
        private_redis.resume()
        assert eventually(lambda: registry.view.reachable, 5 * TIMEOUT_S) is not None
        assert registry.lookup("other") is None
    finally:
        private_redis.resume()
        registry.close()


def test_the_index_is_never_known_and_redis_is_down_listings_raise(private_redis: PrivateRedis) -> None:
    private_redis.kill()
    registry = redis_registry(private_redis.url)
    try:
        with pytest.raises(RegistryUnavailableError):
            registry.tasks()
        private_redis.start()
        assert registry.tasks() == []
    finally:
        registry.close()


def test_resync_repairs_a_change_no_event_announced(redis_url: str) -> None:
    watcher, writer = redis_registry(redis_url), redis_registry(redis_url)
    heard: list[str] = []
    try:
        writer.publish("t", b"v1", method="impart", ratio=8.0)
        watcher.subscribe(heard.append)
        assert watcher.lookup("t").version == 1
        writer.store.put_blob("0" * 64, b"unused")
        silent = writer.store.add_version(writer.require("t").current_version)  # no notify: no event
        assert eventually(lambda: watcher.lookup("t").version == silent.version, 5 * watcher.view.resync_s) is not None
        assert set(heard) == {"t"}
    finally:
        watcher.close()
        writer.close()


def test_events_listener_reconnects_after_a_redis_restart_and_resyncs(private_redis: PrivateRedis) -> None:
    """The periodic resync is off (an hour): only the listener's reconnection and its resync can bring a
    change made right after Redis came back, while the listener was still away."""
    watcher, writer = redis_registry(private_redis.url, 3600.0), redis_registry(private_redis.url, 3600.0)
    heard: list[int] = []
    try:
        writer.publish("t", b"v1", method="impart", ratio=8.0)
        watcher.subscribe(lambda task: heard.append(watcher.view.known(task).version))
        assert watcher.lookup("t").version == 1
        private_redis.kill()
        time.sleep(0.5)
        private_redis.start()
        writer.publish("t", b"v2", method="impart", ratio=8.0)
        assert eventually(lambda: watcher.lookup("t").version == 2, 5.0) is not None
        writer.publish("t", b"v3", method="impart", ratio=8.0)  # and events flow again
        assert eventually(lambda: watcher.lookup("t").version == 3, 2.0) is not None
        assert heard[-2:] == [2, 3]
    finally:
        watcher.close()
        writer.close()


class GatedStore(LocalStore):
    """A LocalStore whose next entry() read, once armed, is held after reading until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.armed = threading.Event()
        self.read_done = threading.Event()
        self.release = threading.Event()

    def entry(self, task: str) -> TaskEntry | None:
        found = super().entry(task)
        if self.armed.is_set():
            self.armed.clear()
            self.read_done.set()
            self.release.wait(5)
        return found


def test_an_older_read_never_replaces_a_newer_one(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "reg")
    registry, other = Registry(store), Registry(LocalStore(tmp_path / "reg"))
    registry.publish("t", b"v1", method="impart", ratio=8.0)
    store.armed.set()
    slow = threading.Thread(target=registry.view.refresh, args=("t",))
    slow.start()
    assert store.read_done.wait(5)  # the slow read saw version 1 and is held
    other.publish("t", b"v2", method="impart", ratio=8.0)
    registry.view.refresh("t")
    assert registry.view.known("t").version == 2
    store.release.set()
    slow.join(5)
    assert registry.view.known("t").version == 2
    registry.close()
    other.close()


def test_a_failing_change_listener_stops_neither_the_others_nor_the_change(tmp_path: Path) -> None:
    """One rule for every announcer (the view, both backends): each listener is called, failures logged."""
    from server.registry.store import announce

    heard: list[str] = []

    def broken(task: str) -> None:
        raise RuntimeError(task)

    announce([broken, heard.append, broken, heard.append], "t")
    assert heard == ["t", "t"]
    registry = Registry(LocalStore(tmp_path / "reg"))
    try:
        registry.subscribe(broken)
        registry.subscribe(heard.append)
        registry.publish("u", b"x", method="impart", ratio=8.0)
        assert "u" in heard and registry.lookup("u") is not None
    finally:
        registry.close()
