"""The benchmark's inputs are what it claims: ImPart-like factors at the requested compression ratio."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ratio", [16, 64])
def test_impart_like_meets_the_compression_ratio(bench, ratio: int) -> None:
    u, s, v = bench.impart_like(192, 576, ratio, torch.Generator().manual_seed(0))
    nnz = int((u != 0).sum() + (v != 0).sum())
    assert abs(nnz - 192 * 576 / ratio) / (192 * 576 / ratio) < 0.05
    assert u.shape[1] == s.numel() == v.shape[1] == int(192 * (1 - bench.BETA))


def test_layout_bytes_count_values_and_indices(bench) -> None:
    vt = torch.zeros(4, 32)
    vt[0, :8] = 1.0
    vt[2, 5] = 1.0
    got = bench.layout_bytes(vt)
    assert got["csr_int32_fp32"] == 9 * 8 + 5 * 4
    assert got["bitmask_bf16"] == 9 * 2 + 4 * 32 // 8
    assert got["seed_bf16"] == 9 * 2 + 4 * 8
