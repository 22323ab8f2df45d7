"""Resident deltas under a byte budget: LRU, pinned while a running request uses them, loaded off-loop.

A load runs in a worker thread (lookup, read, sha256 check, unpack to the kernels' layout) so the step
loop keeps serving other tasks. A delta pinned by a running request is never evicted; an invalidated
one is retired and dropped once its last pin goes. A load starts only while the pinned deltas leave
room; the one that completes may then overshoot the budget by less than itself until pins drain.
"""

from __future__ import annotations

import enum
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from server.engine.types import DeltaSource, TaskNotFoundError, TaskRef
from server.model.deltas import ResidentDelta

Unpack = Callable[[str, bytes], ResidentDelta]


class DeltaLoadFailed(RuntimeError):
    """A task's artifact could not be made resident (corrupt, wrong base, too large for the budget)."""


class DeltaState(enum.Enum):
    READY = "ready"
    LOADING = "loading"
    NO_ROOM = "no_room"
    """Not resident, and pinned deltas leave no room to load it now."""
    FAILED = "failed"


@dataclass(eq=False)
class Entry:
    delta: ResidentDelta
    nbytes: int
    pins: int = 0
    retired: bool = False


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    failures: dict[str, BaseException] = field(default_factory=dict)


class DeltaCache:
    def __init__(
        self, source: DeltaSource, budget_bytes: int, unpack: Unpack, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.source = source
        self.budget = budget_bytes
        self._unpack = unpack
        self._on_change = on_change
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._retired: list[Entry] = []
        self._loading: dict[str, Future[None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-loader")
        self.counters = CacheCounters()

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return self._resident_bytes()

    @property
    def resident_tasks(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def request(self, task: str) -> None:
        """A new request names `task`: count a hit or a miss, and start loading on a miss."""
        with self._lock:
            if task in self._entries:
                self.counters.hits += 1
                return
            self.counters.misses += 1
        self.state(task)

    def state(self, task: str) -> DeltaState:
        """Where `task` stands; starts its load when it is absent and there is room."""
        with self._lock:
            if task in self._entries:
                return DeltaState.READY
            if task in self._loading:
                return DeltaState.LOADING
            if task in self.counters.failures:
                return DeltaState.FAILED
            if self._pinned_bytes() >= self.budget:
                return DeltaState.NO_ROOM
            self._start_load(task)
            return DeltaState.LOADING

    def take_failure(self, task: str) -> BaseException | None:
        """The error of the task's last load, once (a later request retries the load)."""
        with self._lock:
            return self.counters.failures.pop(task, None)

    def acquire(self, task: str) -> Entry:
        """Pin the resident delta of `task` (state() was READY) for one running request."""
        with self._lock:
            entry = self._entries[task]
            entry.pins += 1
            self._entries.move_to_end(task)
            return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.retired and entry.pins == 0:
                self._retired.remove(entry)

    def prefetch(self, task: str) -> Future[None]:
        """A future that completes once `task` is resident (raising its load error, if any)."""
        with self._lock:
            if task in self._entries:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            self.counters.failures.pop(task, None)
            return self._loading.get(task) or self._start_load(task)

    def invalidate(self, task: str) -> None:
        """Drop the task's resident delta now, or once the last running request that pins it ends."""
        with self._lock:
            entry = self._entries.pop(task, None)
            self.counters.failures.pop(task, None)
            if entry is not None and entry.pins > 0:
                entry.retired = True
                self._retired.append(entry)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _start_load(self, task: str) -> Future[None]:
        future = self._pool.submit(self._load, task)
        self._loading[task] = future
        return future

    def _load(self, task: str) -> None:
        started = time.perf_counter()
        try:
            delta = self._unpack(task, self._read_checked(task))
            if delta.nbytes > self.budget:
                raise DeltaLoadFailed(f"delta of {task!r} needs {delta.nbytes} B, over the cache budget {self.budget} B")
            self._insert(task, delta, time.perf_counter() - started)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(task, None)
                self.counters.failures[task] = exc
            raise
        finally:
            self._on_change()

    def _read_checked(self, task: str) -> bytes:
        ref: TaskRef | None = self.source.lookup(task)
        if ref is None:
            raise TaskNotFoundError(f"task {task!r} is not published")
        data = self.source.read(ref)
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256:
            raise DeltaLoadFailed(f"artifact of {task!r} has sha256 {digest}, the index says {ref.sha256}")
        return data

    def _insert(self, task: str, delta: ResidentDelta, seconds: float) -> None:
        with self._lock:
            self._evict_for(delta.nbytes)
            self._entries[task] = Entry(delta, delta.nbytes)
            self._loading.pop(task, None)
            self.counters.loads += 1
            self.counters.load_seconds += seconds

    def _evict_for(self, incoming: int) -> None:
        """Evict unpinned deltas, least recently used first, until `incoming` fits (or none is left)."""
        for task in list(self._entries):
            if self._resident_bytes() + incoming <= self.budget:
                return
            if self._entries[task].pins == 0:
                del self._entries[task]
                self.counters.evictions += 1

    def _resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + sum(e.nbytes for e in self._retired)

    def _pinned_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.pins) + sum(e.nbytes for e in self._retired)
