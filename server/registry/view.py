"""The registry's index as this process last knew it: the one answer to "which version of task T is current".

A RegistryView keeps every task's TaskEntry in memory. It is refreshed three ways: at once for this
process's own changes, on the store's change events (another replica published, rolled back, deleted),
and by a full resync every `resync_s` seconds, which repairs anything an event channel missed (Redis
restarted, a listener reconnected). Events only make a switch prompt; the resync bounds how stale the
view can be while the store answers.

Requests resolve a task from memory, so a known task never waits on the store: while the store is down
or hung, resident tasks keep serving from the last known index. A task the view does not know is read
through to the store (bounded by the store's timeout); only when that fails is RegistryUnavailableError
raised, and until the next successful resync further unknown names fail at once instead of waiting.
Every change of the view is announced to its listeners (the engine retires stale deltas).

Reads race with writes: a read that began before a task was last refreshed does not overwrite it
(each task remembers the generation that last set it), so an older answer never replaces a newer one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from server.registry.records import RegistryError, RegistryUnavailableError, TaskEntry, TaskVersion, validate_task_name
from server.registry.store import ChangeListener, TaskStore, announce

log = logging.getLogger("deltaserve.registry")


class RegistryView:
    """The last known index of a TaskStore, kept current (see the module's docstring)."""

    def __init__(self, store: TaskStore, resync_s: float = 0.5) -> None:
        self.store = store
        self.resync_s = resync_s
        self._entries: dict[str, TaskEntry] = {}
        self._set_at: dict[str, int] = {}
        """The generation at which each task (present or removed) was last set."""
        self._generation = 0
        self._synced = False
        """Whether the whole index was read at least once."""
        self.reachable = True
        """False from a failed read of the store until a full resync succeeds."""
        self._lock = threading.Lock()
        self._listeners: list[ChangeListener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def resolve(self, task: str) -> TaskVersion | None:
        """The task's current version: from memory when known, else read through to the store."""
        found = self.entry(task)
        return None if found is None else found.current_version

    @property
    def known_tasks(self) -> int:
        """How many tasks the last known index holds (never touches the store)."""
        return len(self._entries)

    def known(self, task: str) -> TaskVersion | None:
        """The task's current version as the view knows it now; never touches the store."""
        found = self._entries.get(task)
        return None if found is None else found.current_version

    def entry(self, task: str) -> TaskEntry | None:
        """The task's entry from memory; a task not in memory is read from the store. Raises
        RegistryUnavailableError when the store cannot be reached, at once while it is known to be
        unreachable (until a resync succeeds), so a flood of unknown names cannot tie up threads."""
        validate_task_name(task)
        self.start()
        found = self._entries.get(task)
        if found is not None:
            return found
        if not self.reachable:
            raise RegistryUnavailableError(
                f"the registry is unreachable and task {task!r} is not in its last known index"
            )
        return self.refresh(task)

    def entries(self) -> list[TaskEntry]:
        """The last known index, by name; RegistryUnavailableError when it was never read and the
        store cannot be reached now."""
        self.start()
        if not self._synced:
            self.sync(raising=True)
        entries = self._entries
        return [entries[name] for name in sorted(entries)]

    def refresh(self, task: str) -> TaskEntry | None:
        """Read `task` from the store now and take it into the view; its entry, or None when gone."""
        started = self._generation
        try:
            found = self.store.entry(task)
        except RegistryUnavailableError as exc:
            self._mark_reachable(False, exc)
            raise
        self._apply({task: found}, started)
        return found

    def sync(self, raising: bool = False) -> bool:
        """Read the whole index and take it into the view; False when the store could not be read
        (RegistryUnavailableError instead when `raising`)."""
        started = self._generation
        try:
            fresh = {entry.task: entry for entry in self.store.entries()}
        except (RegistryError, RegistryUnavailableError, OSError) as exc:
            self._mark_reachable(False, exc)
            if raising:
                raise RegistryUnavailableError(f"the registry index cannot be read: {exc}") from exc
            return False
        self._apply(fresh, started, whole=True)
        self._mark_reachable(True)
        return True

    def subscribe(self, listener: ChangeListener) -> None:
        """Call `listener` with a task's name whenever the view's entry of that task changes."""
        self._listeners.append(listener)
        self.start()

    def start(self) -> None:
        """Listen to the store's change events and resync every `resync_s` seconds (once; idempotent)."""
        if self._thread is not None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="registry-resync", daemon=True)
        self.store.subscribe(self._on_event, resync=self._on_resync)
        self._thread.start()

    def close(self) -> None:
        """Stop the resync and forget the listeners (the store is the registry's to close)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0 + self.resync_s)
        self._listeners.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # the resync must outlive any one failure: it is what repairs the view
                log.exception("registry resync failed")
            self._stop.wait(self.resync_s)

    def _on_event(self, task: str) -> None:
        try:
            self.refresh(task)
        except (RegistryError, RegistryUnavailableError, OSError) as exc:
            log.warning("registry event for task %s not applied (%s); the resync will", task, exc)

    def _on_resync(self) -> None:
        self.sync()

    def _apply(self, found: Mapping[str, TaskEntry | None], started: int, whole: bool = False) -> None:
        """Take what a read that began at generation `started` found (with `whole`, every task it did
        not find is gone), except tasks set since that read began. The dict is replaced, never mutated,
        so readers need no lock."""
        changed: list[str] = []
        with self._lock:
            self._generation += 1
            entries = dict(self._entries)
            gone = {task: None for task in entries if task not in found} if whole else {}
            for task, entry in {**found, **gone}.items():
                if self._set_at.get(task, -1) > started or entries.get(task) == entry:
                    continue
                if entry is None:
                    entries.pop(task, None)
                else:
                    entries[task] = entry
                self._set_at[task] = self._generation
                changed.append(task)
            self._entries = entries
            self._synced = self._synced or whole
        for task in changed:
            announce(self._listeners, task)

    def _mark_reachable(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable != self.reachable:
            if reachable:
                log.info("registry reachable again; index resynced (%d tasks)", len(self._entries))
            else:
                log.warning(
                    "registry unreachable (%s); serving the last known index (%d tasks)", error, len(self._entries)
                )
        self.reachable = reachable
