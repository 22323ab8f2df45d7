"""compress(): stream a (base, fine-tune) pair tensor by tensor into one artifact.

Memory: one base tensor, its fine-tuned twin, their delta and its code at a time (plus the small
codes already made). Progress: a tqdm bar per tensor with ETA, and the optional callback.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import numbers
import re
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from compressor.artifact import artifact_bytes, write_atomic
from compressor.checkpoint import Checkpoint, base_fingerprint, check_compatible
from compressor.codec import ModuleCode, decode_dense, json_float
from compressor.masks import MASK_SCHEME
from compressor.methods import (
    MethodParams,
    encode_dare,
    encode_dense,
    encode_full,
    encode_impart,
    encode_lowrank,
)
from compressor.qt import encode_dare_qt, encode_impart_qt
from compressor.summary import ideal_bytes

TOOL = "deltaserve-compressor 0.1"
Encoder = Callable[[str, torch.Tensor, MethodParams], ModuleCode]
"""(module name, 2-D delta [out, in] float32, params) -> the module's code."""
WHOLE = "full"
"""The encoding that stores a 2-D delta whole in 16 bits: no compression, the ratio is ignored."""
ENCODERS: dict[str, Encoder] = {
    "impart": encode_impart,
    "dare": encode_dare,
    "lowrank": encode_lowrank,
    "impart-qt": encode_impart_qt,
    "dare-qt": encode_dare_qt,
    WHOLE: encode_full,
}
"""Every name compress() accepts as `method` (and as `embedding_method`, merge's `store`)."""
METHODS: tuple[str, ...] = tuple(name for name in ENCODERS if name != WHOLE)
"""The compression methods a user picks (CLI --method, the server's uploads and default method):
every encoder but WHOLE, in the order the CLI lists them."""
ADAPTER_METHODS: tuple[str, ...] = ("impart", "lowrank")
"""The methods that can compress a LoRA adapter's delta (compressor.lora.import_lora with a ratio)."""
LINEAR_RE = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ModuleReport:
    """What compressing one module gave: its layout, kept values, stored bytes and error."""

    name: str
    shape: tuple[int, ...]
    group: str
    """"linear" (the paper's layers), "embedding" (other 2-D: embeddings, LM head) or "dense" (1-D)."""
    layout: str
    rank: int
    kept: int
    rel_error: float
    """||D - D_hat||_F / ||D||_F (0 when D is 0)."""
    ideal_bytes: int
    """Bytes the module's information needs (summary.ideal_bytes)."""


@dataclass(frozen=True)
class CompressionReport:
    """What `compress` wrote: the artifact's path, sha256 and size, the method and ratio, and each module's report."""

    out_path: Path
    sha256: str
    artifact_bytes: int
    method: str
    ratio: float
    linear_cr: float
    """The paper's CR: dense entries / kept values, over the linear layers."""
    linear_bytes_ratio: float
    """Bytes of the linear layers' dense 16-bit delta / their ideal stored bytes (CR_qt for -qt methods)."""
    whole_ratio: float
    """Bytes of the dense 16-bit delta / bytes of the artifact."""
    dense_delta_bytes: int
    seconds: float
    modules: tuple[ModuleReport, ...]


def check_method(method: str) -> None:
    """Raise ValueError unless `method` names an encoder (ENCODERS)."""
    if method not in ENCODERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(ENCODERS))}")


def group_of(name: str, ndim: int) -> str:
    """The module's group: "linear" (the paper's projections), "embedding" (other 2-D) or "dense" (1-D)."""
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
    check_method(method)
    if ratio <= 1.0:
        raise ValueError(f"ratio must be > 1 (got {ratio})")
    check_compatible(base_dir, finetuned_dir)
    started = time.perf_counter()
    params = method_params_of(ratio, seed, method_params)
    inputs = _calibration(finetuned_dir, method, params)
    codes, reports = _encode_all(Checkpoint(base_dir), Checkpoint(finetuned_dir), method, params, progress, inputs)
    return write_artifact(codes, reports, base_dir, method, dataclasses.asdict(params), Path(out_path), started)


def _calibration(finetuned_dir: Path | str, method: str, params: MethodParams) -> dict[str, torch.Tensor]:
    """Each linear layer's inputs on the calibration prompts, when GPTQ asks for them."""
    if params.gptq_prompts <= 0:
        return {}
    if method != "impart-qt":
        raise ValueError(f"gptq_prompts applies to impart-qt, not {method}")
    from compressor.calibration import PROMPTS, capture_inputs

    return capture_inputs(finetuned_dir, PROMPTS[: params.gptq_prompts])


def method_params_of(ratio: float, seed: int, extra: Mapping[str, object]) -> MethodParams:
    """MethodParams from ratio, seed and compress()'s keyword arguments: ValueError on an unknown name,
    TypeError on a value that is not of its field's type."""
    hints = typing.get_type_hints(MethodParams)
    unknown = sorted(set(extra) - set(hints))
    if unknown:
        raise ValueError(f"unknown method parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(hints))}")
    for name, value in extra.items():
        if not _fits(value, hints[name]):
            wanted = hints[name].__name__ if isinstance(hints[name], type) else str(hints[name])
            raise TypeError(f"method parameter {name} must be {wanted.replace('typing.', '')}, not {value!r:.40}")
    checked: dict[str, Any] = dict(extra)  # each value checked against its field's type just above
    return dataclasses.replace(MethodParams(ratio=float(ratio), seed=seed), **checked)


def _fits(value: object, hint: object) -> bool:
    """value is of the field type `hint`: a number type takes any number of its kind, a union any member's
    value, a Literal one of its values."""
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if members := typing.get_args(hint):
        return any(_fits(value, member) for member in members)
    if hint is float:
        return isinstance(value, numbers.Real)
    if hint is int:
        return isinstance(value, numbers.Integral)
    return isinstance(hint, type) and isinstance(value, hint)


def write_artifact(
    codes: list[ModuleCode],
    reports: list[ModuleReport],
    base_dir: Path | str,
    method: str,
    params: dict[str, object],
    out_path: Path,
    started: float,
) -> CompressionReport:
    """Serialise codes with their manifest to out_path (atomically) and report on it."""
    data = artifact_bytes(_manifest(base_dir, method, params, reports), codes)
    write_atomic(out_path, data)
    return _report(
        out_path, data, method, json_float(params.get("ratio") or 0.0, "ratio"), reports, time.perf_counter() - started
    )


def _encode_all(
    base: Checkpoint,
    tuned: Checkpoint,
    method: str,
    params: MethodParams,
    progress: Progress | None,
    inputs: dict[str, torch.Tensor],
) -> tuple[list[ModuleCode], list[ModuleReport]]:
    codes, reports = [], []
    names = base.names
    with tqdm(names, desc=f"compress {method}", unit="tensor", leave=False) as bar:
        for done, name in enumerate(bar, start=1):
            bar.set_postfix_str(name, refresh=False)
            delta = tensor_delta(base, tuned, name)
            code, report = encode_tensor(name, delta, method, params, inputs.get(name))
            codes.append(code)
            reports.append(report)
            if progress is not None:
                progress(done, len(names), name)
    return codes, reports


def tensor_delta(base: Checkpoint, tuned: Checkpoint, name: str) -> torch.Tensor:
    """finetuned - base as float32, with one full-size temporary (the embedding is the largest)."""
    delta = tuned.tensor(name).to(torch.float32)
    delta -= base.tensor(name).to(torch.float32)
    return delta


def encode_tensor(
    name: str, delta: torch.Tensor, method: str, params: MethodParams, inputs: torch.Tensor | None = None
) -> tuple[ModuleCode, ModuleReport]:
    """One tensor's code (the method on 2-D deltas, dense for the rest) and its report."""
    if delta.ndim != 2:
        return (code := encode_dense(name, delta)), report_module(name, delta, code)
    if group_of(name, 2) == "embedding":
        method = params.embedding_method or method
        params = dataclasses.replace(params, ratio=params.embedding_ratio or params.ratio)
    check_method(method)
    if method == "impart-qt" and inputs is not None and group_of(name, 2) == "linear":
        code = encode_impart_qt(name, delta, params, inputs)
    else:
        code = ENCODERS[method](name, delta, params)
    return code, report_module(name, delta, code)


def report_module(name: str, delta: torch.Tensor, code: ModuleCode) -> ModuleReport:
    """The module's kept values, rank, bytes and relative error against its true delta."""
    norm = float(torch.linalg.vector_norm(delta))
    err = float(torch.linalg.vector_norm(decode_dense(code).sub_(delta))) / norm if norm > 0 else 0.0
    group = group_of(name, delta.ndim)
    return ModuleReport(name, tuple(delta.shape), group, code.layout, code.rank, code.kept, err, ideal_bytes(code))


def _manifest(
    base_dir: Path | str, method: str, params: dict[str, object], reports: list[ModuleReport]
) -> dict[str, object]:
    return {
        "tool": TOOL,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base_fingerprint": base_fingerprint(base_dir),
        "method": method,
        "ratio": params.get("ratio"),
        "params": params,
        "mask_scheme": MASK_SCHEME,
        "quality": {
            r.name: {"group": r.group, "rank": r.rank, "kept": r.kept, "rel_error": r.rel_error} for r in reports
        },
        "linear_cr": linear_cr(reports),
        "linear_bytes_ratio": linear_bytes_ratio(reports),
        "dense_delta_bytes": dense_delta_bytes(reports),
    }


def linear_cr(reports: list[ModuleReport] | tuple[ModuleReport, ...]) -> float:
    """The linear modules' compression ratio in parameters: dense entries / kept values."""
    linear = [r for r in reports if r.group == "linear"]
    dense = sum(r.shape[0] * r.shape[1] for r in linear)
    kept = sum(r.kept for r in linear)
    return dense / kept if kept else float("inf")


def linear_bytes_ratio(reports: list[ModuleReport] | tuple[ModuleReport, ...]) -> float:
    """The linear modules' dense 16-bit delta bytes / their ideal stored bytes."""
    linear = [r for r in reports if r.group == "linear"]
    stored = sum(r.ideal_bytes for r in linear)
    return dense_delta_bytes(linear) / stored if stored else float("inf")


def dense_delta_bytes(reports: list[ModuleReport] | tuple[ModuleReport, ...]) -> int:
    """Bytes of the whole delta stored densely in 16 bits."""
    return sum(2 * int(torch.Size(r.shape).numel()) for r in reports)


def _report(
    path: Path, data: bytes, method: str, ratio: float, reports: list[ModuleReport], seconds: float
) -> CompressionReport:
    dense = dense_delta_bytes(reports)
    return CompressionReport(
        out_path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        artifact_bytes=len(data),
        method=method,
        ratio=ratio,
        linear_cr=linear_cr(reports),
        linear_bytes_ratio=linear_bytes_ratio(reports),
        whole_ratio=dense / len(data),
        dense_delta_bytes=dense,
        seconds=seconds,
        modules=tuple(reports),
    )
