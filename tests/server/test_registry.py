"""The registry on both backends: atomic publish, versions, rollback, deletion, integrity, sharing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.registry import BlobCorruptError, InvalidTaskNameError, Registry, TaskMissingError, redis_store
from server.registry.local import LocalStore
from server.registry.redis_store import RedisStore


@pytest.fixture(params=["local", "redis"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "local":
        reg = Registry(LocalStore(tmp_path / "registry"))
    else:
        reg = Registry(RedisStore(request.getfixturevalue("redis_url")))
    yield reg
    reg.close()


def test_published_task_reads_back_its_bytes_and_metadata(registry: Registry) -> None:
    published = registry.publish("math", b"artifact-bytes", method="impart", ratio=32.0, quality={"err": 0.5})
    ref = registry.lookup("math")
    assert ref is not None and ref.version == 1 and ref.sha256 == published.sha256 and ref.size == 14
    assert registry.read(ref) == b"artifact-bytes"
    assert registry.require("math").current_version.quality == {"err": 0.5}
    assert [r.task for r in registry.tasks()] == ["math"]


def test_unknown_task_is_none(registry: Registry) -> None:
    assert registry.lookup("nope") is None
    with pytest.raises(TaskMissingError):
        registry.delete("nope")


def test_new_version_becomes_current_and_rollback_restores_the_old(registry: Registry) -> None:
    registry.publish("code", b"v1", method="impart", ratio=32.0)
    registry.publish("code", b"v2", method="dare", ratio=16.0)
    assert registry.read(registry.lookup("code")) == b"v2"
    registry.rollback("code", 1)
    ref = registry.lookup("code")
    assert ref.version == 1 and registry.read(ref) == b"v1"
    assert [v.version for v in registry.require("code").versions] == [1, 2]
    with pytest.raises(TaskMissingError):
        registry.rollback("code", 7)


def test_delete_removes_task_and_only_unshared_blobs(registry: Registry) -> None:
    shared = registry.publish("a", b"same", method="impart", ratio=8.0)
    registry.publish("b", b"same", method="impart", ratio=8.0)
    own = registry.publish("a", b"only-a", method="impart", ratio=8.0)
    registry.delete("a")
    assert registry.lookup("a") is None
    assert registry.store.blob_digests() == {shared.sha256}
    assert own.sha256 not in registry.store.blob_digests()
    assert registry.read(registry.lookup("b")) == b"same"


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", "a:b", ".hidden", "x" * 65, "a..b", "sp ace"])
def test_unsafe_task_names_are_rejected(registry: Registry, name: str) -> None:
    with pytest.raises(InvalidTaskNameError):
        registry.publish(name, b"x", method="impart", ratio=8.0)
    assert registry.tasks() == []


def test_tampered_blob_is_refused_on_read(registry: Registry, tmp_path: Path) -> None:
    registry.publish("t", b"good-bytes", method="impart", ratio=8.0)
    ref = registry.lookup("t")
    store = registry.store
    if isinstance(store, LocalStore):
        (store.root / "blobs" / ref.sha256).write_bytes(b"evil-bytes")
    else:
        store.client.lset(store._key(f"blob:{ref.sha256}"), 0, b"evil-bytes")
    with pytest.raises(BlobCorruptError):
        registry.read(ref)


def test_missing_blob_is_refused_on_read(registry: Registry) -> None:
    """Both backends check every read in one place (store.checked_blob): gone is as bad as tampered."""
    registry.publish("t", b"good-bytes", method="impart", ratio=8.0)
    ref = registry.lookup("t")
    registry.store.delete_blob(ref.sha256)
    with pytest.raises(BlobCorruptError, match="is missing from"):
        registry.read(ref)


def test_blob_without_index_entry_is_invisible_and_collected(registry: Registry) -> None:
    registry.store.put_blob("f" * 64, b"crashed before the index entry")
    assert registry.tasks() == [] and registry.lookup("anything") is None
    registry.publish("kept", b"kept", method="impart", ratio=8.0)
    assert registry.collect_garbage(grace_s=3600.0) == []
    removed = registry.collect_garbage(grace_s=0.0)
    assert len(removed) == 1 and "f" * 64 in removed[0]
    assert registry.read(registry.lookup("kept")) == b"kept"


def test_local_partial_writes_of_a_dead_process_are_collected(tmp_path: Path) -> None:
    registry = Registry(LocalStore(tmp_path / "reg"))
    dead = tmp_path / "reg" / "tmp" / "999999999-abc"
    dead.write_bytes(b"half an artifact")
    live = tmp_path / "reg" / "tmp" / f"{os.getpid()}-def"
    live.write_bytes(b"being written now")
    assert registry.collect_garbage() == ["999999999-abc"]
    assert not dead.exists() and live.exists()


def test_redis_blobs_are_chunked_and_reassembled(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "CHUNK_BYTES", 7)
    registry = Registry(RedisStore(redis_url))
    payload = bytes(range(256)) * 3
    registry.publish("big", payload, method="impart", ratio=8.0)
    ref = registry.lookup("big")
    assert registry.store.client.llen(f"deltaserve:blob:{ref.sha256}") == -(-len(payload) // 7)
    assert registry.read(ref) == payload
    registry.close()


def test_redis_replicas_see_each_others_changes_promptly(redis_url: str) -> None:
    first, second = Registry(RedisStore(redis_url)), Registry(RedisStore(redis_url))
    heard: list[str] = []
    got = threading.Event()
    second.subscribe(lambda task: (heard.append(task), got.set()))
    time.sleep(0.2)
    first.publish("shared", b"bytes", method="impart", ratio=8.0)
    assert second.read(second.lookup("shared")) == b"bytes"
    assert got.wait(5.0) and heard == ["shared"]
    got.clear()
    first.delete("shared")
    assert got.wait(5.0) and heard == ["shared", "shared"]
    assert second.lookup("shared") is None
    first.close()
    second.close()


def test_local_listeners_hear_publish_rollback_and_delete(tmp_path: Path) -> None:
    registry = Registry(LocalStore(tmp_path / "reg"))
    heard: list[str] = []
    registry.subscribe(heard.append)
    registry.publish("t", b"1", method="impart", ratio=8.0)
    registry.publish("t", b"2", method="impart", ratio=8.0)
    registry.rollback("t", 1)
    registry.delete("t")
    assert heard == ["t"] * 4


def test_local_processes_on_one_folder_hear_each_others_changes(tmp_path: Path) -> None:
    """Two servers on one shared volume: the other's publish and delete reach this one's listeners
    (by polling), once each; its own changes are not announced twice."""
    from server.registry.local import POLL_S

    first, second = Registry(LocalStore(tmp_path / "reg")), Registry(LocalStore(tmp_path / "reg"))
    heard: list[str] = []
    got = threading.Event()
    second.subscribe(lambda task: (heard.append(task), got.set()))
    first.publish("shared", b"bytes", method="impart", ratio=8.0)
    assert got.wait(5 * POLL_S) and heard == ["shared"]
    got.clear()
    first.delete("shared")
    assert got.wait(5 * POLL_S) and heard == ["shared", "shared"]
    second.publish("own", b"mine", method="impart", ratio=8.0)
    time.sleep(2.5 * POLL_S)
    assert heard == ["shared", "shared", "own"]
    first.close()
    second.close()
