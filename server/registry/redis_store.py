"""The Redis registry backend: index in hashes, blobs in chunks; replicas share it.

Keys under the prefix (default `deltaserve:`):
    tasks              set of task names
    task:<name>        hash: `current` -> n, `next` -> counter, `v:<n>` -> TaskVersion JSON
    blob:<sha256>      list of chunks; written under upload:<uuid> (with a TTL) and renamed in whole
    upload:<uuid>      a blob being written; a crash leaves it to expire (the TTL collects it)
    events             pub/sub channel: a task's name after it changed
    job:<id>           a compression job's record (JSON, expires JOB_TTL_S after its last write)
    jobs               sorted set of job ids by last write, to list them
Every read of a blob re-hashes it against its key. Every call waits at most the client's timeout (no
retries): an unreachable or hung Redis raises RegistryUnavailableError, never a redis exception. The
events listener reconnects with backoff and, after every (re)subscription, asks for a full resync, since
messages published while it was away are lost.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import ParamSpec, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.registry.records import (
    JobRecord,
    RegistryUnavailableError,
    TaskEntry,
    TaskVersion,
    job_record_from_json,
)
from server.registry.store import (
    JOB_TTL_S,
    ChangeListener,
    Resync,
    Store,
    announce,
    call_each,
    checked_blob,
    checked_job_id,
    referenced_blobs,
    valid_job_id,
)

log = logging.getLogger("deltaserve.registry")
CHUNK_BYTES = 4 << 20
UPLOAD_TTL_S = 3600
LISTEN_POLL_S = 0.2
"""How long the events listener waits for a message before it checks whether it should stop."""
RECONNECT_S = (0.1, 2.0)
"""First and longest wait of the events listener between reconnection attempts (doubling)."""
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)
_P = ParamSpec("_P")
_T = TypeVar("_T")


def _guarded(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """`method` with Redis' connection errors and timeouts raised as RegistryUnavailableError."""

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except UNREACHABLE as exc:
            message = f"the Redis registry cannot be reached: {type(exc).__name__}: {exc}"
            raise RegistryUnavailableError(message) from exc

    return call


_SET_CURRENT = """
if redis.call('HEXISTS', KEYS[1], 'v:' .. ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'current', ARGV[1])
  return 1
end
return 0
"""


class RedisStore(Store):
    """The registry's backend on a Redis shared by every replica (see the module's docstring for its
    keys). Each method does what the Store protocol it implements says."""

    def __init__(self, url: str, prefix: str = "deltaserve:", timeout_s: float = 1.0) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.prefix = prefix
        self._set_current = self.client.register_script(_SET_CURRENT)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listeners: list[ChangeListener] = []
        self._resyncs: list[Resync] = []
        self._lock = threading.Lock()

    @_guarded
    def put_blob(self, sha256: str, source: Path | bytes) -> None:
        upload = self._key(f"upload:{uuid.uuid4().hex}")
        for start, chunk in enumerate(_chunks(source)):
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(upload, chunk)
            if start == 0:
                pipe.expire(upload, UPLOAD_TTL_S)
            pipe.execute()
        pipe = self.client.pipeline(transaction=True)
        pipe.rename(upload, self._key(f"blob:{sha256}"))
        pipe.persist(self._key(f"blob:{sha256}"))
        pipe.execute()

    @_guarded
    def read_blob(self, sha256: str) -> bytes:
        data = b"".join(self._read_chunks(self._key(f"blob:{sha256}")))
        return checked_blob(data or None, sha256, "Redis")  # no chunks: no such blob

    @_guarded
    def delete_blob(self, sha256: str) -> None:
        self.client.delete(self._key(f"blob:{sha256}"))

    @_guarded
    def blob_digests(self) -> set[str]:
        start = len(self._key("blob:"))
        return {key.decode()[start:] for key in self.client.scan_iter(match=self._key("blob:*"), count=500)}

    @_guarded
    def add_version(self, version: TaskVersion) -> TaskVersion:
        key = self._key(f"task:{version.task}")
        number = int(self.client.hincrby(key, "next", 1))
        numbered = replace(version, version=number)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={f"v:{number}": numbered.to_json(), "current": number})
        pipe.sadd(self._key("tasks"), version.task)
        pipe.execute()
        return numbered

    @_guarded
    def entry(self, task: str) -> TaskEntry | None:
        return _entry_from_hash(task, self.client.hgetall(self._key(f"task:{task}")))

    @_guarded
    def entries(self) -> list[TaskEntry]:
        """Every task's entry, read in one round trip after the names."""
        names = self.task_names()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._key(f"task:{name}"))
        found = (_entry_from_hash(name, raw) for name, raw in zip(names, pipe.execute()))
        return [entry for entry in found if entry is not None]

    @_guarded
    def task_names(self) -> list[str]:
        return sorted(_text(name) for name in self.client.smembers(self._key("tasks")))

    @_guarded
    def set_current(self, task: str, version: int) -> bool:
        return bool(self._set_current(keys=[self._key(f"task:{task}")], args=[version]))

    @_guarded
    def delete_task(self, task: str) -> TaskEntry | None:
        found = self.entry(task)
        if found is None:
            return None
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key(f"task:{task}"))
        pipe.srem(self._key("tasks"), task)
        pipe.execute()
        return found

    @_guarded
    def collect_garbage(self, grace_s: float) -> list[str]:
        """Partial uploads expire by their TTL; here: blobs no task version points to."""
        referenced = referenced_blobs(self.entries())
        removed = []
        for sha in self.blob_digests() - referenced:
            idle = self.client.object("idletime", self._key(f"blob:{sha}"))
            if idle is not None and idle >= grace_s:
                self.delete_blob(sha)
                removed.append(f"blob:{sha}")
        return removed

    @_guarded
    def put_job(self, record: JobRecord) -> None:
        job_id = checked_job_id(record)
        pipe = self.client.pipeline()
        pipe.set(self._key(f"job:{job_id}"), json.dumps(record), ex=JOB_TTL_S)
        pipe.zadd(self._key("jobs"), {job_id: time.time()})
        pipe.execute()

    @_guarded
    def job(self, job_id: str) -> JobRecord | None:
        if not valid_job_id(job_id):
            return None
        raw = self.client.get(self._key(f"job:{job_id}"))
        return None if raw is None else job_record_from_json(raw)

    @_guarded
    def jobs(self) -> list[JobRecord]:
        """Records by the index of job ids; ids whose record expired leave the index here."""
        self.client.zremrangebyscore(self._key("jobs"), "-inf", time.time() - JOB_TTL_S)
        ids = [_text(raw) for raw in self.client.zrange(self._key("jobs"), 0, -1) if isinstance(raw, bytes | str)]
        if not ids:
            return []
        raws = self.client.mget([self._key(f"job:{job_id}") for job_id in ids])
        gone = [job_id for job_id, raw in zip(ids, raws) if raw is None]
        if gone:
            self.client.zrem(self._key("jobs"), *gone)
        return [job_record_from_json(raw) for raw in raws if raw is not None]

    def subscribe(self, listener: ChangeListener, resync: Resync | None = None) -> None:
        with self._lock:
            self._listeners.append(listener)
            if resync is not None:
                self._resyncs.append(resync)
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="registry-events", daemon=True)
                self._thread.start()

    @_guarded
    def notify(self, task: str) -> None:
        self.client.publish(self._key("events"), task)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)
        self._listeners.clear()
        self._resyncs.clear()
        self.client.close()

    def _listen(self) -> None:
        """Hear `events` until closed; after a lost connection reconnect with backoff (from the shortest
        wait again once a subscription held), then resync."""
        wait = RECONNECT_S[0]
        while not self._stop.is_set():
            subscribed = threading.Event()
            try:
                self._listen_once(subscribed)
            except UNREACHABLE as exc:
                wait = RECONNECT_S[0] if subscribed.is_set() else wait
                log.warning(
                    "registry events: Redis connection lost (%s); reconnecting in %.1fs", type(exc).__name__, wait
                )
                self._stop.wait(wait)
                wait = min(2 * wait, RECONNECT_S[1])

    def _listen_once(self, subscribed: threading.Event) -> None:
        # redis-py leaves pubsub() unannotated
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._key("events"))
            pubsub.get_message(timeout=LISTEN_POLL_S)  # the subscription's confirmation: the channel is live
            subscribed.set()
            call_each(self._resyncs, "resync")
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=LISTEN_POLL_S)
                if message is not None and message.get("type") == "message":
                    announce(self._listeners, _text(message["data"]))
        finally:
            pubsub.close()

    def _read_chunks(self, key: str) -> Iterator[bytes]:
        start = 0
        while batch := self.client.lrange(key, start, start + 15):
            yield from (_bytes(chunk) for chunk in batch)
            start += len(batch)

    def _key(self, suffix: str) -> str:
        return self.prefix + suffix


def _entry_from_hash(task: str, raw: Mapping[bytes | str, bytes | str]) -> TaskEntry | None:
    """The task's entry from its hash's fields; None when the hash is gone (no `current`)."""
    fields = {_text(name): value for name, value in raw.items()}
    if "current" not in fields:
        return None
    versions = sorted(
        (TaskVersion.from_json(value) for name, value in fields.items() if name.startswith("v:")),
        key=lambda v: v.version,
    )
    return TaskEntry(task=task, current=int(fields["current"]), versions=tuple(versions))


def _text(value: bytes | str) -> str:
    """A reply as text (the client returns bytes: it does not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    """A reply as bytes (what the client returns for a blob's chunks)."""
    return value if isinstance(value, bytes) else value.encode()


def _chunks(source: Path | bytes) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, max(len(source), 1), CHUNK_BYTES):
            yield source[start : start + CHUNK_BYTES]
        return
    with source.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk
