"""Merging several tasks' deltas into one (the paper's third result): Task Arithmetic and TIES.

Inputs are artifacts (deltas already processed by DARE / ImPart / ..., reconstructed here) or
fine-tuned folders (unprocessed deltas). The merged delta is stored whole in 16 bits ("full") or
re-compressed with any method, as an artifact the server serves like any other task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from compressor.artifact import load_artifact
from compressor.checkpoint import Checkpoint, check_compatible
from compressor.pipeline import (
    ENCODERS,
    WHOLE,
    CompressionReport,
    encode_tensor,
    method_params_of,
    write_artifact,
)

DeltaOf = Callable[[str], torch.Tensor]


def task_arithmetic(deltas: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """lambda * sum of the deltas."""
    return scale * torch.stack(list(deltas)).sum(dim=0)


def ties(deltas: Sequence[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    """TIES-merging: trim each delta to its top `density` share by magnitude, elect each entry's sign
    by the sum of the trimmed deltas, average the entries that agree with it, scale by lambda."""
    trimmed = torch.stack([_trim(d, density) for d in deltas])  # [T, *shape]
    sign = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(dim=0).clamp_min(1)
    return scale * (trimmed * agree).sum(dim=0) / count


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, round(delta.numel() * density))
    if keep >= delta.numel():
        return delta
    threshold = delta.abs().reshape(-1).kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def delta_source(path: Path, base_dir: Path) -> DeltaOf:
    """name -> float32 delta of one input: an artifact file or a fine-tuned model folder."""
    if path.is_dir():
        check_compatible(base_dir, path)
        base, tuned = Checkpoint(base_dir), Checkpoint(path)
        return lambda name: tuned.tensor(name).to(torch.float32) - base.tensor(name).to(torch.float32)
    artifact = load_artifact(path, base_dir=base_dir)
    return lambda name: artifact.module(name).dense()


def merge(
    inputs: Sequence[Path],
    base_dir: Path | str,
    out_path: Path | str,
    how: str = "ta",
    scale: float = 1.0,
    density: float = 0.2,
    store: str = WHOLE,
    ratio: float = 32.0,
    seed: int = 0,
) -> CompressionReport:
    """Merge the inputs' deltas tensor by tensor and write one artifact."""
    if how not in ("ta", "ties"):
        raise ValueError(f"unknown merge {how!r}; choose ta or ties")
    if store not in ENCODERS:
        raise ValueError(f"unknown store {store!r}")
    started, base = time.perf_counter(), Path(base_dir)
    sources = [delta_source(Path(p), base) for p in inputs]
    params = method_params_of(ratio, seed, {})
    codes, reports = [], []
    for name in Checkpoint(base).names:
        deltas = [src(name) for src in sources]
        merged = task_arithmetic(deltas, scale) if how == "ta" else ties(deltas, density, scale)
        code, report = encode_tensor(name, merged, store, params)
        codes.append(code)
        reports.append(report)
    meta = {
        "how": how,
        "scale": scale,
        "density": density,
        "store": store,
        "ratio": ratio,
        "seed": seed,
        "inputs": [Path(p).name for p in inputs],
    }
    return write_artifact(codes, reports, base, f"merge-{how}", meta, Path(out_path), started)
