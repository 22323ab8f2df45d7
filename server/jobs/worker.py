"""The compression worker process: check, compress and verify a checkpoint away from the server.

Why a process and not a thread of the server: compression runs Python loops between its torch
kernels (GIL time taken from the event loop and the engine's step thread), peaks in memory with
the checkpoint's tensors, and must be stoppable at shutdown; a process gives all three. Measured on
the tiny base (2 loaded cores, 2-token chats back to back during an impart-qt job): in a thread,
median 34 ms (35 idle), max 172 ms; in this worker, median 12 ms (11 idle), max 315 ms: on a model
this small the machine's noise dominates, and one earlier chat during an in-thread job took 1.46 s.
Progress goes back over a queue handed over when the process starts. The worker is spawned, so a
script that builds the app must guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

ProgressItem: TypeAlias = tuple[str, int, int, str]
"""(job id, tensors done, tensors in all, the tensor being compressed)."""
ProgressQueue: TypeAlias = "Queue[ProgressItem | None]"
"""Progress from the worker to the server's listener; None tells the listener to stop."""
_progress: ProgressQueue | None = None
"""The queue this worker reports to."""
PARENT_CHECK_S = 1.0


def init_worker(progress: ProgressQueue) -> None:
    """The worker process's initializer: keep the progress queue, and exit once the server is gone."""
    global _progress  # noqa: PLW0603 - the worker process's one queue, set by its initializer
    _progress = progress
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A server killed outright (SIGKILL, OOM) cannot stop its worker: the worker stops itself once it
    is re-parented, instead of compressing for nobody. Polling getppid is portable (no prctl)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def compress_checkpoint(
    job_id: str,
    base_dir: Path,
    checkpoint_dir: Path,
    out: Path,
    method: str,
    ratio: float,
    seed: int,
    params: dict[str, object],
) -> tuple[dict[str, object], int]:
    """check_compatible -> compress -> verify_artifact (the artifact decodes in full against the base:
    shapes, finite values, indices); the compression report as plain JSON values and the number of
    tensors. Raises the compressor's errors (a fine-tune with non-finite weights fails the verify)."""
    import compressor
    from server.jobs.report import report_dict

    tensors = [0]

    def progress(done: int, total: int, tensor: str) -> None:
        """The compressor's per-tensor report, passed on to the server."""
        tensors[0] = total
        if _progress is not None:
            _progress.put((job_id, done, total, tensor))

    compressor.check_compatible(base_dir, checkpoint_dir)
    report = compressor.compress(
        base_dir, checkpoint_dir, out, method=method, ratio=ratio, seed=seed, progress=progress, **params
    )
    compressor.verify_artifact(out, base_dir)
    return report_dict(report), tensors[0]


def spawn_context() -> multiprocessing.context.SpawnContext:
    """Spawn, not fork: the server holds threads (engine step loop, Redis listener) a fork would copy."""
    return multiprocessing.get_context("spawn")
