"""One decode step's delta products over a whole model: the C kernel against per-slot torch, and the base.

    python bench/kernel_step.py --tasks-dir DIR     # DIR: ImPart artifacts of the base (*.safetensors)
    python bench/kernel_step.py                     # synthetic CR-32 artifacts (bench/serving.py makes them)

For T tasks (each a separate resident copy of one of the artifacts, round-robin) and R rows per task,
it runs `kernels.add_delta` over every decoder-layer matrix of the model, as one engine step does, and
times: the C kernel path (kernels.cpu default), the torch-only path (`USE_NATIVE = False`: per slot
torch.sparse or dense GEMMs), and the base `F.linear` calls of the same step. Best of --repeats, one
thread. Prints and writes the ratios to bench/results/kernel_step.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels
from bench.measure import add_out, bench_parser, write_results
from kernels import cpu
from server.model.deltas import ResidentDelta, unpack_artifact


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--tasks-dir", type=Path, help="folder of artifacts (default: synthetic CR-32 ones)")
    p.add_argument("--tasks", type=int, default=16, help="resident task copies (T)")
    p.add_argument("--rows", type=str, default="1,2,8,32,64", help="rows per task (R), comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    add_out(p, "kernel_step")
    return p.parse_args(argv)


def best_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(deltas: list[ResidentDelta], rows: int, repeats: int) -> dict[str, float]:
    names = [n for n in deltas[0].factors if "embed_tokens" not in n and "lm_head" not in n]
    tasks = len(deltas)
    n = tasks * rows
    plan = kernels.plan_batch(torch.arange(n) % tasks, tasks)
    gen = torch.Generator().manual_seed(rows)
    shapes = {name: deltas[0].factors[name].shape for name in names}
    xs = {name: torch.randn(n, shapes[name][1], generator=gen) for name in names}
    ys = {name: torch.zeros(n, shapes[name][0]) for name in names}
    weights = {name: torch.randn(shapes[name], generator=gen) for name in names}
    per_name = {name: [d.factors[name] for d in deltas] for name in names}

    def delta_step() -> None:
        for name in names:
            kernels.add_delta(ys[name], xs[name], plan, per_name[name])

    def base_step() -> None:
        for name in names:
            torch.nn.functional.linear(xs[name], weights[name])

    native = best_seconds(delta_step, repeats)
    cpu.USE_NATIVE = False
    try:
        torch_only = best_seconds(delta_step, repeats)
    finally:
        cpu.USE_NATIVE = True
    base = best_seconds(base_step, repeats)
    return {
        "rows_per_task": rows,
        "matrices": len(names),
        "native_ms": native * 1e3,
        "torch_ms": torch_only * 1e3,
        "base_ms": base * 1e3,
        "native/torch": native / torch_only,
        "native/base": native / base,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.tasks_dir is None:
        from bench.serving import synthetic_artifacts

        folder, _ = synthetic_artifacts(args.base, 2, 32.0)
    else:
        folder = args.tasks_dir
    artifacts = sorted(folder.glob("*.safetensors"))
    if not artifacts:
        raise SystemExit(f"no *.safetensors artifacts in {folder}")
    deltas = [
        unpack_artifact(
            f"t{i}", artifacts[i % len(artifacts)].read_bytes(), args.base, torch.device("cpu"), torch.float32
        )
        for i in range(args.tasks)
    ]
    factors = list(deltas[0].factors.values())
    storage = {
        "dense": sum(f.native_kind == 1 for f in factors),
        "csr": sum(f.native_kind == 0 for f in factors),
        "other": sum(f.native_kind is None for f in factors),
    }
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        results.append(measure(deltas, rows, args.repeats))
        r = results[-1]
        print(
            f"T={args.tasks} R={rows}: native {r['native_ms']:.1f} ms, torch {r['torch_ms']:.1f} ms, "
            f"base {r['base_ms']:.1f} ms; native/torch {r['native/torch']:.2f}, native/base {r['native/base']:.2f}",
            flush=True,
        )
    write_results(
        {
            "command": "python bench/kernel_step.py " + " ".join(sys.argv[1:]),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "torch": torch.__version__,
                "threads": 1,
            },
            "artifacts": [p.name for p in artifacts],
            "tasks": args.tasks,
            "factor_storage": storage,
            "resident_bytes_per_task": deltas[0].nbytes,
            "results": results,
            "ratios": {
                f"{key}@R{r['rows_per_task']}": round(r[key], 3)
                for r in results
                for key in ("native/torch", "native/base")
            },
        },
        args.out,
    )


if __name__ == "__main__":
    main()
