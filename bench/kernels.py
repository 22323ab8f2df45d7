"""Microbenchmark of the batched sparse delta products: base, delta, both, per-task dense and LoRA.

For each shape x compression ratio x rows N x tasks T it times, in the same run and on the same inputs:
  base   F.linear(x, W)                    (the base product alone)
  delta  kernels.add_delta                 (every task's delta, one call)
  both   kernels.delta_linear              (base + delta)
  dense  per-task W_t = W + Delta_t        (the "merge the fine-tune" alternative: one GEMM per task)
  lora   dense LoRA per task, rank = nnz / (out + in)   (same number of parameters as the delta)
plus the delta's bytes (values + indices) and the time to read them once at the measured copy bandwidth.
The machine is shared and busy: compare the ratios inside one row, not absolute times across runs.

    .venv/bin/python bench/kernels.py --quick        # a few points, < 1 minute
    .venv/bin/python bench/kernels.py                # the full grid of docs/kernels.md (long on 2 cores)
    .venv/bin/python bench/kernels.py --device cuda  # on a GPU (Triton path)
Results: bench/results/kernels.json (--quick: kernels-quick.json; --out to change); docs/kernels.md
holds the table. On this 2-core shared machine the recorded run used --threads 1 --min-time 0.05.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

if Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
    sys.path.pop(0)  # run as a script, this file would shadow the `kernels` package it measures
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels
from bench.measure import RESULTS

SHAPES = {
    "smollm2_attn": (576, 576),
    "smollm2_kv": (192, 576),
    "smollm2_mlp": (1536, 576),
    "7b_attn": (4096, 4096),
    "7b_mlp": (14336, 4096),
}
FULL_GRID = {
    "shapes": ["smollm2_attn", "smollm2_mlp", "7b_attn", "7b_mlp"],
    "ratios": [16, 32, 64],
    "rows": [1, 8, 32, 128],
    "tasks": [1, 4, 16],
}
QUICK_GRID = {"shapes": ["smollm2_attn", "7b_attn"], "ratios": [32], "rows": [1, 16], "tasks": [1, 16]}
BETA = 0.8
"""ImPart pre-prune: keep the top floor(r * (1 - BETA)) singular vectors."""
MAX_DENSE_COPIES = 2
"""Materialised W + Delta copies cycled for the dense comparison (memory; bigger than any cache)."""


def impart_like(out: int, inn: int, ratio: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Random factors with ImPart's structure at compression ratio `ratio` (parameters counted).

    K = floor(min(out, in) * (1 - BETA)); keep fraction per vector decays like importance s_k^0.5 with
    s_k ~ k^-0.5, scaled so that nnz(u) + nnz(v) = out * in / ratio; survivors drawn at random.
    """
    k = max(1, math.floor(min(out, inn) * (1 - BETA)))
    shape_k = torch.arange(1, k + 1, dtype=torch.float64) ** -0.25
    budget = out * inn / ratio
    lo, hi = 0.0, 1e6
    for _ in range(60):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if float((c * shape_k).clamp(max=1).sum()) * (out + inn) < budget else (lo, c)
    keep = (lo * shape_k).clamp(max=1).float()
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    u = torch.randn(out, k, generator=gen) * (torch.rand(out, k, generator=gen) < keep)
    v = torch.randn(inn, k, generator=gen) * (torch.rand(inn, k, generator=gen) < keep)
    return u / keep, s / math.sqrt(inn), v / keep


def timeit(fn: Callable[[], object], min_time: float) -> float:
    """Median seconds per call over repeats filling about min_time (after one warm-up call)."""
    return time_interleaved({"fn": fn}, min_time)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], min_time: float) -> dict[str, float]:
    """Median seconds per call of each fn, timed in round-robin rounds so that load from other
    processes on a shared machine hits every alternative alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < min_time * len(fns) and rounds < 200):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes per second read by a large device copy (half the read+write traffic)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timeit(lambda: _synced(dst.copy_, src), 0.5)
    return src.numel() * 4 / seconds


def _synced(fn: Callable, *args: object) -> object:
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


@dataclass(frozen=True)
class Point:
    shape: str
    out: int
    inn: int
    ratio: float
    rows: int
    tasks: int
    dtype: str
    delta_bytes: int
    delta_nnz: int
    lora_rank: int
    t_base: float
    t_delta: float
    t_both: float
    t_dense: float
    t_lora: float
    t_read_bytes: float

    @property
    def ratios(self) -> dict[str, float]:
        return {
            "both_over_base": self.t_both / self.t_base,
            "delta_over_read": self.t_delta / self.t_read_bytes,
            "lora_over_delta": self.t_lora / self.t_delta,
            "dense_over_both": self.t_dense / self.t_both,
        }


@dataclass(frozen=True)
class Case:
    """The inputs of one grid point, built once and shared by every timed alternative."""

    x: Tensor
    weight: Tensor
    plan: kernels.BatchPlan
    factors: list
    raw: list
    lora: list
    row_slots: Tensor


def build_case(out: int, inn: int, ratio: float, rows: int, tasks: int, dtype: torch.dtype, device: str) -> Case:
    gen = torch.Generator().manual_seed(rows * 1000 + tasks)
    raw = [impart_like(out, inn, ratio, gen) for _ in range(tasks)]
    factors = [kernels.pack_factors(*r, device=device, dtype=dtype) for r in raw]
    row_slots = torch.arange(rows) % tasks
    rank = lora_rank(factors[0], out, inn)
    lora = [
        (
            torch.randn(rank, inn, generator=gen).to(device, dtype),
            torch.randn(out, rank, generator=gen).to(device, dtype),
        )
        for _ in range(tasks)
    ]
    weight = (torch.randn(out, inn, generator=gen) / math.sqrt(inn)).to(device, dtype)
    x = torch.randn(rows, inn, generator=gen).to(device, dtype)
    plan = kernels.plan_batch(torch.sort(row_slots).values.to(device), tasks)
    return Case(x, weight, plan, factors, raw, lora, torch.sort(row_slots).values)


def lora_rank(f: kernels.ResidentFactors, out: int, inn: int) -> int:
    """The LoRA rank with as many parameters as the delta's stored values."""
    nnz = f.u.nnz + f.vt.nnz if not (f.u.dense or f.vt.dense) else f.rank * (out + inn)
    return max(1, round(nnz / (out + inn)))


def run_dense_per_task(case: Case, dense_weights: list[Tensor]) -> Tensor:
    """One GEMM per task with its own materialised weight (cycled over MAX_DENSE_COPIES copies)."""
    y = torch.empty(case.x.shape[0], case.weight.shape[0], dtype=case.x.dtype, device=case.x.device)
    for rows in case.plan.slots:
        w = dense_weights[rows.slot % len(dense_weights)]
        y[rows.start : rows.stop] = F.linear(rows.take(case.x), w)
    return y


def run_lora_delta(y: Tensor, case: Case) -> Tensor:
    """The dense-LoRA delta per task, y[rows] += (x A^T) B^T: the comparison for add_delta."""
    for rows in case.plan.slots:
        a, b = case.lora[rows.slot]
        y[rows.start : rows.stop] += F.linear(F.linear(rows.take(case.x), a), b)
    return y


def measure(
    name: str, ratio: float, rows: int, tasks: int, dtype: torch.dtype, device: str, bw: float, min_time: float
) -> Point:
    out, inn = SHAPES[name]
    case = build_case(out, inn, ratio, rows, tasks, dtype, device)
    dense_weights = [
        (case.weight.float() + (u @ torch.diag(s) @ v.T).to(device)).to(dtype)
        for u, s, v in case.raw[:MAX_DENSE_COPIES]
    ]
    y = torch.empty(rows, out, dtype=dtype, device=device)
    t = time_interleaved({
        "base": lambda: _synced(F.linear, case.x, case.weight),
        "delta": lambda: _synced(kernels.add_delta, y, case.x, case.plan, case.factors),
        "both": lambda: _synced(kernels.delta_linear, case.x, case.weight, None, case.plan, case.factors),
        "dense": lambda: _synced(run_dense_per_task, case, dense_weights),
        "lora": lambda: _synced(run_lora_delta, y, case),
    }, min_time)  # fmt: skip
    t_base, t_delta, t_both, t_dense, t_lora = (t[k] for k in ("base", "delta", "both", "dense", "lora"))
    nbytes = sum(f.nbytes for f in case.factors)
    nnz = sum(f.u.nnz + f.vt.nnz for f in case.factors)
    return Point(name, out, inn, ratio, rows, tasks, str(dtype).removeprefix("torch."), nbytes, nnz,
                 lora_rank(case.factors[0], out, inn), t_base, t_delta, t_both, t_dense, t_lora, nbytes / bw)  # fmt: skip


def measure_grouping(tasks: int, rows: int, device: str, min_time: float) -> dict[str, float]:
    """SmolLM2 attention input: q, k, v deltas as three calls vs one stacked call (stack_factors)."""
    gen = torch.Generator().manual_seed(7)
    outs, inn = (576, 192, 192), 576
    per_matrix = [
        [kernels.pack_factors(*impart_like(o, inn, 32, gen), device=device) for _ in range(tasks)] for o in outs
    ]
    stacked = [kernels.stack_factors([m[t] for m in per_matrix], outs, inn) for t in range(tasks)]
    x = torch.randn(rows, inn, device=device)
    plan = kernels.plan_batch((torch.arange(rows) % tasks).sort().values.to(device), tasks)
    ys = [torch.zeros(rows, o, device=device) for o in outs]
    y_all = torch.zeros(rows, sum(outs), device=device)
    t = time_interleaved({
        "separate": lambda: [_synced(kernels.add_delta, y, x, plan, f) for y, f in zip(ys, per_matrix)],
        "stacked": lambda: _synced(kernels.add_delta, y_all, x, plan, stacked),
    }, min_time)  # fmt: skip
    return {"tasks": tasks, "rows": rows, "qkv_three_calls_s": t["separate"], "qkv_stacked_s": t["stacked"],
            "speedup": t["separate"] / t["stacked"]}  # fmt: skip


def layout_bytes(vt: Tensor, block: int = 16) -> dict[str, int]:
    """Bytes of one factor [K, in] (values + index positions) in each candidate layout, same nnz.

    block16 assumes the mask is drawn in blocks of 16 consecutive entries (one int32 per block)."""
    k, inn = vt.shape
    nnz = int((vt != 0).sum())
    return {
        "csr_int32_fp32": nnz * 8 + (k + 1) * 4,
        "csr_int16_bf16": nnz * 4 + (k + 1) * 4,
        "bitmask_bf16": nnz * 2 + k * inn // 8,
        "seed_bf16": nnz * 2 + k * 8,
        "block16_bf16": -(-nnz // block) * (block * 2 + 4) + (k + 1) * 4,
    }


def _unpack_bitmask(bits: Tensor, shape: tuple[int, int]) -> Tensor:
    """uint8 [K * in / 8] -> the positions (flat int64) of set bits: the per-call decode a bitmask costs."""
    weights = 2 ** torch.arange(8, dtype=torch.uint8)
    return ((bits[:, None] & weights) != 0).reshape(-1).nonzero().squeeze(1)


def _affine_positions(counts: Tensor, rows: int, gen: torch.Generator) -> Tensor:
    """Positions regenerated from per-vector (a, b): j -> (a * j + b) mod rows, a odd (rows a power of 2)."""
    a = torch.randint(0, rows // 2, (counts.numel(),), generator=gen) * 2 + 1
    b = torch.randint(0, rows, (counts.numel(),), generator=gen)
    vec = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    j = torch.arange(vec.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return (a[vec] * j + b[vec]) % rows


def measure_layouts(name: str, ratio: float, min_time: float) -> dict:
    """Index cost of one shrink at decode (N = 1): bytes per layout, and what decoding positions costs per call."""
    out, inn = SHAPES[name]
    gen = torch.Generator().manual_seed(3)
    u, s, v = impart_like(out, inn, ratio, gen)
    f = kernels.pack_factors(u, s, v)
    vt = (v * s).T.contiguous()
    x = torch.randn(1, inn, generator=gen)
    plan = kernels.plan_batch(torch.zeros(1, dtype=torch.int64), 1)
    y = torch.zeros(1, out)
    flat = (vt != 0).reshape(-1)
    counts = (vt != 0).sum(1)
    bits = (flat.reshape(-1, 8).to(torch.uint8) * 2 ** torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)
    keep_blocks = torch.rand(vt.shape[0], inn // 16, generator=gen) < counts[:, None] / inn
    blk_vec, blk_id = keep_blocks.nonzero(as_tuple=True)
    blk_vals = torch.randn(blk_vec.numel(), 16, generator=gen)
    fns = {
        "csr_int32_torch_shrink": lambda: torch.sparse.mm(f.vt_torch, x.T),
        "c_kernel_add_delta": lambda: kernels.add_delta(y, x, plan, [f]),
        "bitmask_decode_only": lambda: _unpack_bitmask(bits, vt.shape),
        "seed_randperm_decode_only": lambda: [torch.randperm(inn, generator=gen)[: int(c)] for c in counts[:64]],
        "seed_affine_decode_only": lambda: _affine_positions(counts, inn, gen),
    }
    fns["block16_torch_shrink"] = lambda: torch.zeros(vt.shape[0]).index_add_(
        0, blk_vec, (x.view(-1, 16)[blk_id] * blk_vals).sum(1)
    )
    times = time_interleaved(fns, min_time)
    times["seed_randperm_decode_only"] *= vt.shape[0] / 64
    return {"shape": name, "ratio": ratio, "K": int(vt.shape[0]), "nnz_vt": int(flat.sum()),
            "bytes_vt": layout_bytes(vt), "seconds": times}  # fmt: skip


def run_grid(grid: dict, dtype: torch.dtype, device: str, bw: float, min_time: float) -> list[Point]:
    points = []
    for shape in grid["shapes"]:
        for ratio in grid["ratios"]:
            for rows in grid["rows"]:
                for tasks in grid["tasks"]:
                    if tasks > rows:
                        continue
                    p = measure(shape, ratio, rows, tasks, dtype, device, bw, min_time)
                    print(_row(p), flush=True)
                    points.append(p)
    return points


def _row(p: Point) -> str:
    r = p.ratios
    return (
        f"| {p.shape} | {p.ratio:g} | {p.rows} | {p.tasks} | {p.t_base * 1e3:.3f} | {p.t_delta * 1e3:.3f} | "
        f"{r['both_over_base']:.2f} | {p.delta_bytes / 2**20:.2f} | {r['delta_over_read']:.2f} | "
        f"{p.t_lora * 1e3:.3f} | {r['lora_over_delta']:.2f} | {r['dense_over_both']:.2f} |"
    )


TABLE_HEAD = (
    "| shape | CR | N | T | base ms | delta ms | both/base | delta MiB | delta/read | lora ms | lora/delta | dense/both |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def print_table(path: Path) -> None:
    """The markdown table of a results file (what docs/kernels.md shows)."""
    report = json.loads(path.read_text())
    print(f"`{report['command']}`, copy read bandwidth {report['machine']['copy_bandwidth_read_Bps'] / 1e9:.2f} GB/s\n")
    print(TABLE_HEAD)
    fields = {f for f in Point.__dataclass_fields__}
    for row in report["points"]:
        print(_row(Point(**{k: v for k, v in row.items() if k in fields})))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few points (< 1 minute)")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown table of a results file and exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of repeats per timing")
    ap.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/kernels.json (--quick: kernels-quick.json)"
    )
    args = ap.parse_args(argv)
    if args.table:
        print_table(args.table)
        return
    args.out = args.out or RESULTS / ("kernels-quick.json" if args.quick else "kernels.json")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    args.min_time = min_time
    bw = copy_bandwidth(torch.device(args.device))
    print(f"copy bandwidth (read): {bw / 1e9:.2f} GB/s; threads {torch.get_num_threads()}")
    print(TABLE_HEAD)
    points = run_grid(QUICK_GRID if args.quick else FULL_GRID, dtype, args.device, bw, min_time)
    grouping = [measure_grouping(t, 16, args.device, min_time) for t in (1, 4, 16)]
    for g in grouping:
        print("grouping (SmolLM2 q/k/v, 16 rows):", json.dumps({k: round(v, 6) for k, v in g.items()}))
    layouts = [measure_layouts(n, 32, min_time) for n in ("smollm2_attn", "7b_attn")] if args.device == "cpu" else []
    for lay in layouts:
        print("layouts:", json.dumps(lay))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_report(args, bw, points, grouping, layouts), indent=1))
    print(f"wrote {args.out}")


def _report(
    args: argparse.Namespace, bw: float, points: list[Point], grouping: list[dict], layouts: list[dict]
) -> dict:
    return {
        "command": "bench/kernels.py" + (" --quick" if args.quick else "")
        + f" --device {args.device} --dtype {args.dtype} --threads {args.threads} --min-time {args.min_time}",
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "copy_bandwidth_read_Bps": bw},
        "points": [{**asdict(p), **p.ratios} for p in points],
        "grouping": grouping,
        "layouts": layouts,
    }  # fmt: skip


if __name__ == "__main__":
    main()
