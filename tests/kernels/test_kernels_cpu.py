"""The CPU path against the reference on fresh random inputs across task mixes, shapes and dtypes.

Outputs updated in place start from random garbage, so a path that skips rows (or writes rows it
should not) fails; every case draws new inputs.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from kernel_mixes import MIX_NAMES, dense_factors, impart_factors, make_mix, seed_of

import kernels
from kernels import cpu, native
from kernels import reference as ref
from kernels.layout import NativeKind

SHAPES = {"square": (48, 48), "wide": (40, 96), "tall_mlp": (112, 48), "gqa_kv": (16, 64)}
RANKS = (6, 0, 13, None, 3)
"""Per slot: rank (0 = empty matrix, None = no delta for this slot)."""


@pytest.fixture(params=["native", "torch"])
def cpu_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the C kernel and through the torch.sparse fallback."""
    monkeypatch.setattr(cpu, "USE_NATIVE", request.param == "native")
    return request.param


def test_native_kernel_builds_where_a_compiler_exists() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the torch fallback is what runs")
    assert native.library() is not None


def test_slot_table_follows_its_one_column_list() -> None:
    """native.SLOT_COLUMNS is the C slot table's one definition: the rows Python packs follow it, and the
    build hands the C source every column index and NativeKind value."""
    gen = torch.Generator().manual_seed(3)
    f = kernels.pack_factors(*impart_factors(20, 12, 4, gen))
    plan = kernels.plan_batch(torch.tensor([-1, 0, 0]), 1)
    (rows,) = plan.slots
    table = list(native._slot_table([(rows, f)]))
    assert len(table) == native.SLOT_COLS == len(native.SLOT_COLUMNS)
    cell = dict(zip(native.SLOT_COLUMNS, table))
    assert (cell["VT_CROW"], cell["VT_VALUES"], cell["U_COL"]) == (
        f.vt.crow.data_ptr(),
        f.vt.values.data_ptr(),
        f.u.col.data_ptr(),
    )
    assert (cell["RANK"], cell["OFFSET"], cell["COUNT"], cell["KIND"]) == (4, rows.offset, 2, f.native_kind)
    defines = native._defines()
    assert f"-DSLOT_KIND={native.SLOT_COLUMNS.index('KIND')}" in defines
    assert {f"-DKIND_{k.name}={k.value}" for k in NativeKind} <= set(defines)


def _factor_sets(out: int, inn: int, gen: torch.Generator) -> tuple[list, list]:
    raw = [None if k is None else impart_factors(out, inn, k, gen) for k in RANKS]
    raw[-1] = dense_factors(out, inn, 3, gen)
    fast = [None if r is None else kernels.pack_factors(*r) for r in raw]
    slow = [None if r is None else ref.pack_factors(*r) for r in raw]
    return fast, slow


def _tol(t: torch.Tensor, dtype: torch.dtype) -> dict:
    scale = float(t.float().abs().max()) + 1.0
    return {"rtol": 0, "atol": (1e-5 if dtype == torch.float32 else 2e-2) * scale}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", MIX_NAMES)
@pytest.mark.parametrize("n", [1, 7, 130])
def test_add_delta_matches_reference(mix: str, n: int, dtype: torch.dtype, cpu_backend: str) -> None:
    seed = seed_of((mix, n, dtype, cpu_backend))
    gen = torch.Generator().manual_seed(seed)
    for shape in list(SHAPES.values())[seed % 2 :: 2]:  # half the shapes per case, all across the cases
        fast, slow = _factor_sets(*shape, gen)
        m = make_mix(mix, n, len(RANKS), gen)
        x = torch.randn(n, shape[1], generator=gen).to(dtype)
        poison = (torch.randn(n, shape[0], generator=gen) * 100).to(dtype)
        want = ref.add_delta(poison.clone(), x, ref.plan_batch(m.row_slots, m.num_slots), slow)
        got = kernels.add_delta(poison.clone(), x, kernels.plan_batch(m.row_slots, m.num_slots), fast)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **_tol(want, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", MIX_NAMES)
def test_shrink_then_expand_match_reference(mix: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed_of((mix, dtype, "se")))
    fast, slow = _factor_sets(*SHAPES["wide"], gen)
    m = make_mix(mix, 33, len(RANKS), gen)
    x = torch.randn(33, 96, generator=gen).to(dtype)
    fplan, rplan = kernels.plan_batch(m.row_slots, m.num_slots), ref.plan_batch(m.row_slots, m.num_slots)
    h = kernels.shrink(x, fplan, fast)
    torch.testing.assert_close(h, ref.shrink(x, rplan, slow), rtol=0, atol=1e-4)
    poison = (torch.randn(33, 40, generator=gen) * 100).to(dtype)
    got = kernels.expand(poison.clone(), h, fplan, fast)
    want = ref.expand(poison.clone(), h, rplan, slow)
    torch.testing.assert_close(got.float(), want.float(), **_tol(want, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["one", "distinct", "none"])
def test_delta_linear_matches_reference(mix: str, dtype: torch.dtype, cpu_backend: str) -> None:
    gen = torch.Generator().manual_seed(seed_of((mix, dtype, "dl")))
    fast, slow = _factor_sets(*SHAPES["tall_mlp"], gen)
    m = make_mix(mix, 9, len(RANKS), gen)
    x = torch.randn(9, 48, generator=gen).to(dtype)
    w, b = torch.randn(112, 48, generator=gen).to(dtype), torch.randn(112, generator=gen).to(dtype)
    got = kernels.delta_linear(x, w, b, kernels.plan_batch(m.row_slots, m.num_slots), fast)
    want = ref.delta_linear(x, w, b, ref.plan_batch(m.row_slots, m.num_slots), slow)
    assert got.dtype == dtype and got.shape == (9, 112)
    torch.testing.assert_close(got.float(), want.float(), **_tol(want, dtype))


@pytest.mark.parametrize("mix", MIX_NAMES)
def test_embedding_delta_matches_reference(mix: str, cpu_backend: str) -> None:
    gen = torch.Generator().manual_seed(seed_of((mix, "emb", cpu_backend)))
    fast, slow = _factor_sets(200, 32, gen)
    m = make_mix(mix, 25, len(RANKS), gen)
    ids = torch.randint(0, 200, (25,), generator=gen)
    got = kernels.embedding_delta(ids, kernels.plan_batch(m.row_slots, m.num_slots), fast, dtype=torch.bfloat16)
    want = ref.embedding_delta(ids, ref.plan_batch(m.row_slots, m.num_slots), slow, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2 * (float(want.abs().max()) + 1))


def test_all_slots_without_delta_leave_y_untouched() -> None:
    y = torch.randn(5, 8)
    plan = kernels.plan_batch(torch.tensor([0, 1, -1, 0, 1]), 2)
    f0 = kernels.pack_factors(torch.zeros(8, 0), torch.zeros(0), torch.zeros(6, 0))
    assert torch.equal(kernels.add_delta(y.clone(), torch.randn(5, 6), plan, [f0, None]), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_slots_take_the_c_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense (LowRank-like) factors under NATIVE_MAX_ROWS_DENSE rows never reach a torch product."""
    if native.library() is None:
        pytest.skip("no C compiler: the torch fallback is what runs")
    gen = torch.Generator().manual_seed(seed_of(("dense-native", dtype)))
    raw = [dense_factors(70, 37, k, gen) for k in (5, 17, 1)]
    fast = [kernels.pack_factors(*r) for r in raw]
    slow = [ref.pack_factors(*r) for r in raw]
    m = make_mix("distinct", 11, 3, gen)
    x = torch.randn(11, 37, generator=gen).to(dtype)
    poison = (torch.randn(11, 70, generator=gen) * 100).to(dtype)
    want = ref.add_delta(poison.clone(), x, ref.plan_batch(m.row_slots, m.num_slots), slow)

    def no_torch(*args: object) -> None:
        raise AssertionError("a dense slot went through torch")

    monkeypatch.setattr(cpu, "_mm", no_torch)
    got = kernels.add_delta(poison.clone(), x, kernels.plan_batch(m.row_slots, m.num_slots), fast)
    torch.testing.assert_close(got.float(), want.float(), **_tol(want, dtype))
