"""compress(): stream a (base, fine-tune) pair tensor by tensor into one artifact.

Memory: one base tensor, its fine-tuned twin, their delta and its code at a time (plus the small
codes already made). Progress: a tqdm bar per tensor with ETA, and the optional callback.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from compressor.artifact import artifact_bytes, write_atomic
from compressor.checkpoint import Checkpoint, base_fingerprint, check_compatible
from compressor.codec import ModuleCode, decode_dense
from compressor.methods import ENCODERS, MethodParams, encode_dense

TOOL = "deltaserve-compressor 0.1"
METHODS = ("impart", "dare", "lowrank")
LINEAR_RE = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ModuleReport:
    name: str
    shape: tuple[int, ...]
    group: str
    """"linear" (the paper's layers), "embedding" (other 2-D: embeddings, LM head) or "dense" (1-D)."""
    layout: str
    rank: int
    kept: int
    rel_error: float
    """||D - D_hat||_F / ||D||_F (0 when D is 0)."""


@dataclass(frozen=True)
class CompressionReport:
    out_path: Path
    sha256: str
    artifact_bytes: int
    method: str
    ratio: float
    linear_cr: float
    """The paper's CR: dense entries / kept values, over the linear layers."""
    whole_ratio: float
    """Bytes of the dense 16-bit delta / bytes of the artifact."""
    dense_delta_bytes: int
    seconds: float
    modules: tuple[ModuleReport, ...]


def group_of(name: str, ndim: int) -> str:
    if ndim != 2:
        return "dense"
    return "linear" if LINEAR_RE.search(name) else "embedding"


def compress(
    base_dir: Path | str,
    finetuned_dir: Path | str,
    out_path: Path | str,
    method: str = "impart",
    ratio: float = 32.0,
    seed: int = 0,
    progress: Progress | None = None,
    **method_params: object,
) -> CompressionReport:
    """Compress finetuned - base into an artifact at out_path; see the module docstring."""
    if method not in ENCODERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(ENCODERS))}")
    if ratio <= 1.0:
        raise ValueError(f"ratio must be > 1 (got {ratio})")
    check_compatible(base_dir, finetuned_dir)
    started = time.perf_counter()
    params = MethodParams(ratio=float(ratio), seed=seed, **method_params)  # type: ignore[arg-type]
    codes, reports = _encode_all(Checkpoint(base_dir), Checkpoint(finetuned_dir), method, params, progress)
    manifest = _manifest(base_dir, method, params, reports)
    data = artifact_bytes(manifest, codes)
    write_atomic(Path(out_path), data)
    return _report(Path(out_path), data, method, params, reports, time.perf_counter() - started)


def _encode_all(
    base: Checkpoint, tuned: Checkpoint, method: str, params: MethodParams, progress: Progress | None
) -> tuple[list[ModuleCode], list[ModuleReport]]:
    codes, reports = [], []
    names = base.names
    with tqdm(names, desc=f"compress {method}", unit="tensor", leave=False) as bar:
        for done, name in enumerate(bar, start=1):
            bar.set_postfix_str(name, refresh=False)
            delta = tuned.tensor(name).to(torch.float32) - base.tensor(name).to(torch.float32)
            code, report = encode_tensor(name, delta, method, params)
            codes.append(code)
            reports.append(report)
            if progress is not None:
                progress(done, len(names), name)
    return codes, reports


def encode_tensor(name: str, delta: torch.Tensor, method: str, params: MethodParams) -> tuple[ModuleCode, ModuleReport]:
    """One tensor's code (the method on 2-D deltas, dense for the rest) and its report."""
    group = group_of(name, delta.ndim)
    code = encode_dense(name, delta) if group == "dense" else ENCODERS[method](name, delta, params)
    norm = float(torch.linalg.vector_norm(delta))
    err = float(torch.linalg.vector_norm(delta - decode_dense(code))) / norm if norm > 0 else 0.0
    return code, ModuleReport(name, tuple(delta.shape), group, code.layout, code.rank, code.kept, err)


def _manifest(
    base_dir: Path | str, method: str, params: MethodParams, reports: list[ModuleReport]
) -> dict[str, object]:
    return {
        "tool": TOOL,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_fingerprint": base_fingerprint(base_dir),
        "method": method,
        "params": {"ratio": params.ratio, "seed": params.seed, "beta": params.beta, "c": params.c},
        "mask_scheme": "splitmix64-rank-v1",
        "quality": {r.name: {"group": r.group, "rank": r.rank, "kept": r.kept, "rel_error": r.rel_error}
                    for r in reports},
        "linear_cr": linear_cr(reports),
        "dense_delta_bytes": dense_delta_bytes(reports),
    }


def linear_cr(reports: list[ModuleReport] | tuple[ModuleReport, ...]) -> float:
    linear = [r for r in reports if r.group == "linear"]
    dense = sum(r.shape[0] * r.shape[1] for r in linear)
    kept = sum(r.kept for r in linear)
    return dense / kept if kept else float("inf")


def dense_delta_bytes(reports: list[ModuleReport] | tuple[ModuleReport, ...]) -> int:
    """Bytes of the whole delta stored densely in 16 bits."""
    return sum(2 * int(torch.Size(r.shape).numel()) for r in reports)


def _report(
    path: Path, data: bytes, method: str, params: MethodParams, reports: list[ModuleReport], seconds: float
) -> CompressionReport:
    dense = dense_delta_bytes(reports)
    return CompressionReport(
        out_path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        artifact_bytes=len(data),
        method=method,
        ratio=params.ratio,
        linear_cr=linear_cr(reports),
        whole_ratio=dense / len(data),
        dense_delta_bytes=dense,
        seconds=seconds,
        modules=tuple(reports),
    )
