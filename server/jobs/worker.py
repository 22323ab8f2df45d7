"""The compression worker process: check, compress and verify a checkpoint away from the server.

Compression runs Python loops as well as torch kernels; in the server's process it would hold the
GIL long enough to stall the event loop (measured on the tiny base: a 2-token chat took 1.46 s
during a 1.4 s job instead of ~0.03 s). In a worker process it competes for cores only.
Progress goes back over a queue handed over when the process starts.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

_progress: Any = None
"""The queue of (job id, done, total, tensor name) this worker reports to."""


def init_worker(progress: Any) -> None:
    global _progress
    _progress = progress


def compress_checkpoint(job_id: str, base_dir: Path, checkpoint_dir: Path, out: Path, method: str, ratio: float,
                        seed: int, params: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """check_compatible -> compress -> load_artifact (the artifact loads back against the base); the
    compression report as plain JSON values and the number of tensors. Raises the compressor's errors."""
    import compressor

    from server.jobs.report import report_dict

    tensors = [0]

    def progress(done: int, total: int, tensor: str) -> None:
        tensors[0] = total
        if _progress is not None:
            _progress.put((job_id, done, total, tensor))

    compressor.check_compatible(base_dir, checkpoint_dir)
    report = compressor.compress(base_dir, checkpoint_dir, out, method=method, ratio=ratio, seed=seed,
                                 progress=progress, **params)
    compressor.load_artifact(out, base_dir)
    return report_dict(report), tensors[0]


def spawn_context() -> multiprocessing.context.SpawnContext:
    """Spawn, not fork: the server holds threads (engine step loop, Redis listener) a fork would copy."""
    return multiprocessing.get_context("spawn")
