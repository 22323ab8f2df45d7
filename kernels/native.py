"""The CPU kernel in C (kernels/csrc/delta_cpu.c), compiled on first use and called through ctypes.

Why hand-written: torch.sparse.mm costs ~40-70 us per call before any work (MKL builds a sparse
handle each time), i.e. two calls per task slot per matrix; SmolLM2-size deltas hold ~5k entries,
so that fixed cost was 95% of the time. The C kernel handles every slot of a step in one call.
Why ctypes and plain C rather than a torch C++ extension: it compiles in about a second with the
system C compiler (torch headers take a minute), and it needs no torch ABI. Without a C compiler
the CPU path falls back to torch.sparse (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from kernels.layout import NativeKind, ResidentFactors
from kernels.plan import BatchPlan, SlotRows

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "delta_cpu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c11")
SLOT_COLUMNS = ("VT_CROW", "VT_COL", "VT_VALUES", "RANK", "U_CROW", "U_COL", "U_VALUES", "OFFSET", "COUNT", "KIND")
"""The C kernels' slot table, one int64 row per slot: vt's and u's array addresses and K
(ResidentFactors.addresses), the slot's offset into plan.order, its row count, its NativeKind.
The one definition: the build passes SLOT_COLS and each SLOT_<column> index to the C source."""
SLOT_COLS = len(SLOT_COLUMNS)


def _defines() -> tuple[str, ...]:
    """-D flags that give the C source the slot table's layout and the NativeKind values."""
    columns = [f"-DSLOT_{name}={i}" for i, name in enumerate(SLOT_COLUMNS)]
    kinds = [f"-DKIND_{kind.name}={kind.value}" for kind in NativeKind]
    return (f"-DSLOT_COLS={SLOT_COLS}", *columns, *kinds)


def _cache_dir() -> Path:
    home = Path.home() / ".cache" / "deltaserve" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir())


def _cpu_flags() -> str:
    """The CPU's feature flags (the build uses -march=native, so the cache key must name the CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), platform.processor())


def _build(compiler: str) -> Path:
    """Compile the C source once per (source, flags, compiler, CPU) into the cache; atomic under races."""
    flags = (*FLAGS, *_defines())
    key = SOURCE.read_bytes() + " ".join((compiler, *flags, _cpu_flags())).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    target = _cache_dir() / f"delta_cpu-{digest}.so"
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None when no C compiler is available or the build fails (logged once)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the CPU delta path falls back to torch.sparse")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("building %s failed (%s): the CPU delta path falls back to torch.sparse", SOURCE.name, exc)
        return None
    fn = lib.deltaserve_add_delta
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, ptr, ptr, ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int, i64, i64]
    fn.restype = ctypes.c_int
    emb = lib.deltaserve_embedding_delta
    emb.argtypes = [i64, ptr, ptr, ptr, ptr, i64]
    emb.restype = None
    return lib


def add_delta(y: Tensor, x: Tensor, plan: BatchPlan, slots: list[tuple[SlotRows, ResidentFactors]]) -> bool:
    """y[rows of each slot] += its delta(x[rows]) in one C call; False when the kernel cannot take it.

    slots: (rows, factors) pairs whose factors have a native_kind. y: [N, out], x: [N, in],
    float32 or bfloat16 with unit stride along the last dimension.
    """
    lib = library()
    if lib is None or not _takes(y) or not _takes(x) or x.device.type != "cpu":
        return False
    meta = _slot_table(slots)
    status = lib.deltaserve_add_delta(
        len(slots), meta, plan.order.data_ptr(),
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), x.shape[1],
        y.data_ptr(), int(y.dtype == torch.bfloat16), y.stride(0), y.shape[1],
    )  # fmt: skip
    if status == -1:
        raise MemoryError("deltaserve_add_delta could not allocate its scratch buffers")
    if status != 0:
        raise ValueError(f"deltaserve_add_delta refused a slot table (status {status})")
    return True


def embedding_delta(out: Tensor, ids: Tensor, plan: BatchPlan, slots: list[tuple[SlotRows, ResidentFactors]]) -> bool:
    """out[rows of each slot] += (u[ids] * s) @ v.T in one C call; False when the kernel is unavailable.

    out: [N, hidden] float32 contiguous (zeros on entry for the rows of `slots`), ids: [N] int64.
    """
    lib = library()
    if lib is None or out.dtype != torch.float32 or not out.is_contiguous() or ids.device.type != "cpu":
        return False
    ids64 = ids.to(torch.int64).contiguous()
    table = _slot_table(slots)
    lib.deltaserve_embedding_delta(
        len(slots), table, plan.order.data_ptr(), ids64.data_ptr(), out.data_ptr(), out.shape[1]
    )
    return True


def _slot_table(slots: list[tuple[SlotRows, ResidentFactors]]) -> ctypes.Array[ctypes.c_int64]:
    """The C kernels' slot table: SLOT_COLS int64 per slot, in the order of SLOT_COLUMNS."""
    flat: list[int] = []
    for rows, f in slots:
        kind = f.native_kind
        if kind is None:
            raise ValueError("the C kernel cannot read these factors (see ResidentFactors.native_kind)")
        flat += (*f.addresses, rows.offset, rows.count, kind)
    return (ctypes.c_int64 * len(flat))(*flat)


def _takes(t: Tensor) -> bool:
    return t.dtype in (torch.float32, torch.bfloat16) and t.dim() == 2 and t.stride(1) == 1
