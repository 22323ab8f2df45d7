"""Resident deltas under a byte budget: keyed by version, LRU, pinned while running requests use them.

An entry is keyed by (task, artifact sha256): a request carries the TaskVersion it resolved, and only the
entry of exactly that sha serves it, so a resident older version is never used for a newer one (and a
rollback is a different key too) whether or not a change notification arrived. When a version becomes
resident, the task's other versions are retired: dropped now, or once their last pin goes.

A load runs in a worker thread (read, which the source checks against the sha, then unpack to the
kernels' layout) so the step loop keeps serving other tasks. A load starts only from an explicit call:
`request` (a new request's miss) or `load` (the scheduler's admission), both only while pinned deltas
leave room, or `prefetch` (an admin's warm-up); `state` only reports. The load that completes may
overshoot the budget until pins drain. Resident bytes are brought back under the budget, least
recently used first, whenever it may help: on inserts, hits, releases and withdrawals. Two kinds of
entry are spared: one pinned by a running request, and one wanted by a waiting request (it is about
to be pinned; evicting it would only load it again).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from server.engine.types import DeltaLoadError, DeltaSource
from server.model.deltas import ResidentDelta
from server.registry import TaskVersion

Unpack = Callable[[TaskVersion, bytes], ResidentDelta]
Key = tuple[str, str]
"""(task, artifact sha256): one version of one task."""


class DeltaState(enum.Enum):
    """Where one version's delta stands in the cache."""

    READY = "ready"
    LOADING = "loading"
    ABSENT = "absent"
    """Not resident nor loading, and pinned deltas leave room: `load` would start it."""
    NO_ROOM = "no_room"
    """Not resident, and pinned deltas leave no room to load it now."""
    FAILED = "failed"


@dataclass(eq=False)
class Entry:
    """One resident delta, its size and the running requests that pin it."""

    delta: ResidentDelta
    nbytes: int
    pins: int = 0
    retired: bool = False


@dataclass
class CacheCounters:
    """Hits, misses, evictions and loads since the start; the last failure of each version."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    failures: dict[Key, BaseException] = field(default_factory=dict)


def key_of(ref: TaskVersion) -> Key:
    """The cache key of a version."""
    return (ref.task, ref.sha256)


class DeltaCache:
    """Resident deltas by version under a byte budget (see the module docstring)."""

    def __init__(
        self, source: DeltaSource, budget_bytes: int, unpack: Unpack, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.source = source
        self.budget = budget_bytes
        self._unpack = unpack
        self._on_change = on_change
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._retired: list[Entry] = []
        self._loading: dict[Key, Future[None]] = {}
        self._wanted: Counter[Key] = Counter()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-loader")
        self.counters = CacheCounters()

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident deltas, retired ones still pinned included."""
        with self._lock:
            return self._resident_bytes()

    @property
    def resident_tasks(self) -> list[str]:
        """Tasks with a resident version, least recently used first."""
        with self._lock:
            return list(dict.fromkeys(task for task, _ in self._entries))

    def resident_version(self, task: str) -> str | None:
        """The sha256 of the task's resident version (the most recently used one), or None."""
        with self._lock:
            shas = [sha for name, sha in self._entries if name == task]
        return shas[-1] if shas else None

    def request(self, ref: TaskVersion) -> None:
        """A new request waits for `ref`: count a hit or a miss, mark it wanted, load it on a miss."""
        with self._lock:
            key = key_of(ref)
            self._wanted[key] += 1
            if key in self._entries:
                self.counters.hits += 1
                self._shrink()
                return
            self.counters.misses += 1
        self.load(ref)

    def want(self, ref: TaskVersion) -> None:
        """A request waits for `ref` again (it was preempted); not counted as a hit or miss."""
        with self._lock:
            self._wanted[key_of(ref)] += 1

    def withdraw(self, ref: TaskVersion) -> None:
        """A waiting request for `ref` left without running (aborted, failed)."""
        with self._lock:
            self._unwant(key_of(ref))
            self._shrink()

    def state(self, ref: TaskVersion) -> DeltaState:
        """Where `ref` stands (a pure query: it starts nothing)."""
        with self._lock:
            return self._state(key_of(ref))

    def load(self, ref: TaskVersion) -> DeltaState:
        """Start the load of `ref` when it is absent (not resident, loading or failed) and pinned deltas
        leave room; where it then stands."""
        with self._lock:
            state = self._state(key_of(ref))
            if state is not DeltaState.ABSENT:
                return state
            self._start_load(ref)
            return DeltaState.LOADING

    def take_failure(self, ref: TaskVersion) -> BaseException | None:
        """The error of the version's last load, once (a later request retries the load)."""
        with self._lock:
            return self.counters.failures.pop(key_of(ref), None)

    def acquire(self, ref: TaskVersion) -> Entry | None:
        """Pin the resident delta of `ref` for one running request; None when it is not resident (a
        load of another delta may evict it between load() and this call)."""
        key = key_of(ref)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.pins += 1
            self._unwant(key)
            self._entries.move_to_end(key)
            return entry

    def release(self, entry: Entry) -> None:
        """Unpin an entry `acquire` returned (its running request ended)."""
        with self._lock:
            entry.pins -= 1
            if entry.retired and entry.pins == 0:
                self._retired.remove(entry)
            self._shrink()

    def prefetch(self, ref: TaskVersion) -> Future[None]:
        """A future that completes once `ref` is resident (raising its load error, if any)."""
        key = key_of(ref)
        with self._lock:
            if key in self._entries:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            self.counters.failures.pop(key, None)
            return self._loading.get(key) or self._start_load(ref)

    def invalidate(self, task: str, keep_sha: str | None = None) -> None:
        """Retire the task's resident versions other than `keep_sha`: dropped now, or once the last
        running request that pins them ends. Only frees memory early: a request never uses a version
        other than the one it resolved."""
        with self._lock:
            self._retire_task(task, keep_sha)
            for key in [k for k in self.counters.failures if k[0] == task and k[1] != keep_sha]:
                del self.counters.failures[key]

    def close(self) -> None:
        """Stop the loader thread, waiting for a load in progress."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _state(self, key: Key) -> DeltaState:
        """Under the lock: where `key` stands."""
        if key in self._entries:
            return DeltaState.READY
        if key in self._loading:
            return DeltaState.LOADING
        if key in self.counters.failures:
            return DeltaState.FAILED
        return DeltaState.NO_ROOM if self._pinned_bytes() >= self.budget else DeltaState.ABSENT

    def _start_load(self, ref: TaskVersion) -> Future[None]:
        future = self._pool.submit(self._run_load, ref)
        self._loading[key_of(ref)] = future
        return future

    def _run_load(self, ref: TaskVersion) -> None:
        """In the loader thread: read, check and unpack `ref`, then insert it (or record its failure)."""
        started = time.perf_counter()
        try:
            delta = self._unpack(ref, self.source.read(ref))
            if delta.nbytes > self.budget:
                raise DeltaLoadError(
                    f"delta of {ref.task!r} needs {delta.nbytes} B, over the cache budget {self.budget} B"
                )
            self._insert(ref, delta, time.perf_counter() - started)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key_of(ref), None)
                self.counters.failures[key_of(ref)] = exc
            raise
        finally:
            self._on_change()

    def _insert(self, ref: TaskVersion, delta: ResidentDelta, seconds: float) -> None:
        key = key_of(ref)
        with self._lock:
            self._retire_task(ref.task, ref.sha256)
            self._evict_for(delta.nbytes)
            self._entries[key] = Entry(delta, delta.nbytes)
            self._loading.pop(key, None)
            self.counters.loads += 1
            self.counters.load_seconds += seconds

    def _retire_task(self, task: str, keep_sha: str | None) -> None:
        """Under the lock: take the task's versions other than `keep_sha` out of service."""
        for key in [k for k in self._entries if k[0] == task and k[1] != keep_sha]:
            entry = self._entries.pop(key)
            if entry.pins > 0:
                entry.retired = True
                self._retired.append(entry)

    def _evict_for(self, incoming: int) -> None:
        """Evict unpinned deltas, least recently used first, until `incoming` fits (or none is left)."""
        for key in list(self._entries):
            if self._resident_bytes() + incoming <= self.budget:
                return
            if self._entries[key].pins == 0:
                del self._entries[key]
                self.counters.evictions += 1

    def _shrink(self) -> None:
        """Under the lock: evict least recently used deltas neither pinned nor wanted while over budget."""
        for key in list(self._entries):
            if self._resident_bytes() <= self.budget:
                return
            if self._entries[key].pins == 0 and self._wanted[key] == 0:
                del self._entries[key]
                self.counters.evictions += 1

    def _unwant(self, key: Key) -> None:
        if self._wanted[key] <= 1:
            self._wanted.pop(key, None)
        else:
            self._wanted[key] -= 1

    def _resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + sum(e.nbytes for e in self._retired)

    def _pinned_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.pins) + sum(e.nbytes for e in self._retired)
