"""Pick ImPart's (beta, C) on a validation callback, as the paper does on a validation set.

One streaming pass: each tensor's SVD is computed once (as many vectors as the widest grid point
needs) and every grid point's code is made from it; then each candidate artifact is scored by
`validate(path)` (higher is better; e.g. the testbed's task accuracy on a few validation prompts),
and the best one is written to out_path.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from compressor.budget import pre_prune
from compressor.checkpoint import Checkpoint, check_compatible
from compressor.codec import ModuleCode
from compressor.methods import Factors, MethodParams, encode_dense, impart_code
from compressor.pipeline import (
    CompressionReport,
    ModuleReport,
    method_params_of,
    report_module,
    tensor_delta,
    write_artifact,
)
from compressor.qt import impart_qt_code, qt_svd_rank
from compressor.svd import top_svd

DEFAULT_GRID: tuple[tuple[float, float], ...] = ((0.8, 0.5), (0.6, 1.0), (0.8, 1.0), (0.6, 0.5), (0.7, 0.75))
"""(beta, C): the two settings of the paper's code and points between them."""
RankOf = Callable[[tuple[int, int], MethodParams], int]
"""(shape [out, in], params) -> how many singular vectors the code needs."""
CodeOf = Callable[[str, tuple[int, int], Factors, MethodParams], ModuleCode]
"""(name, shape, top singular triplets, params) -> the module's code."""


def _impart_rank(shape: tuple[int, int], params: MethodParams) -> int:
    return pre_prune(shape, params.ratio, params.beta)[0]


TUNABLE: dict[str, tuple[RankOf, CodeOf]] = {
    "impart": (_impart_rank, impart_code),
    "impart-qt": (qt_svd_rank, impart_qt_code),
}
"""The methods search can tune (ImPart's, the ones with beta and C; a subset of compressor.METHODS), each with
its SVD rank and its code from shared singular triplets."""


@dataclass(frozen=True)
class SearchResult:
    """The (beta, C) search's outcome: the best pair, every pair's score, and the best artifact's report."""

    best: tuple[float, float]
    """(beta, C) of the highest score."""
    scores: dict[tuple[float, float], float]
    report: CompressionReport
    """The report of the best artifact, written to out_path."""


def search(
    base_dir: Path | str,
    finetuned_dir: Path | str,
    out_path: Path | str,
    validate: Callable[[Path], float],
    method: str = "impart",
    ratio: float = 32.0,
    seed: int = 0,
    grid: Sequence[tuple[float, float]] = DEFAULT_GRID,
    **method_params: object,
) -> SearchResult:
    """Compress at every (beta, C) of the grid in one pass, score each with validate, keep the best."""
    if method not in TUNABLE:
        raise ValueError(f"search tunes ImPart's beta and C; method {method!r} has neither")
    check_compatible(base_dir, finetuned_dir)
    started = time.perf_counter()
    points = [replace(method_params_of(ratio, seed, method_params), beta=b, c=c) for b, c in grid]
    encoded = _encode_grid(Checkpoint(base_dir), Checkpoint(finetuned_dir), method, points)
    scratch = Path(tempfile.mkdtemp(prefix="deltaserve-search-"))
    try:
        reports = {}
        for point, (codes, mods) in zip(points, encoded):
            path = scratch / f"beta{point.beta}-c{point.c}.safetensors"
            params = {**point.__dict__, "searched": [list(g) for g in grid]}
            reports[(point.beta, point.c)] = write_artifact(codes, mods, base_dir, method, params, path, started)
        scores = {key: float(validate(rep.out_path)) for key, rep in reports.items()}
        best = max(scores, key=lambda key: scores[key])
        shutil.copyfile(reports[best].out_path, out_path)
        return SearchResult(best, scores, replace(reports[best], out_path=Path(out_path)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _encode_grid(
    base: Checkpoint, tuned: Checkpoint, method: str, points: list[MethodParams]
) -> list[tuple[list[ModuleCode], list[ModuleReport]]]:
    out: list[tuple[list[ModuleCode], list[ModuleReport]]] = [([], []) for _ in points]
    for name in tqdm(base.names, desc=f"search {method}", unit="tensor", leave=False):
        delta = tensor_delta(base, tuned, name)
        codes = _grid_codes(name, delta, method, points)
        for (code_list, reports), code in zip(out, codes):
            code_list.append(code)
            reports.append(report_module(name, delta, code))
    return out


def _grid_codes(name: str, delta: torch.Tensor, method: str, points: list[MethodParams]) -> list[ModuleCode]:
    if delta.ndim != 2:
        return [encode_dense(name, delta)] * len(points)
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    rank_of, code_of = TUNABLE[method]
    k = max(rank_of(shape, p) for p in points)
    svd = top_svd(delta, k, points[0].svd, points[0].device, points[0].seed)
    return [code_of(name, shape, svd, p) for p in points]
