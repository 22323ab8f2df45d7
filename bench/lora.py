"""LoRA benchmark: 16 mixed rank-16 LoRA tasks vs 16 mixed ImPart CR-32 tasks vs the base, tokens/s in one run.

Scenarios, each at every concurrency (closed loop, as bench/serving.py), interleaved per round in one process:
  base       every request on the base alone
  lora16     requests round-robin over 16 LoRA tasks: synthetic PEFT-format adapters (rank --rank on
             q, k, v, o, gate, up, down, random factors) written here and imported by compressor.lora
  impart16   requests round-robin over 16 ImPart tasks (bench/serving.py's synthetic CR --ratio artifacts,
             reused round-robin)
The LoRA path is dense factors of rank r; ImPart's are sparse factors of larger rank.

    .venv/bin/python bench/lora.py --quick     # concurrency 8, short outputs (a few minutes)
Results: bench/results/lora.json (--out): tokens/s (best of --rounds), the ratios of the best, and the ratios
inside each round with their medians (`round_ratios`). The machine is shared: read the ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
    sys.path.pop(0)  # as a script, bench/kernels.py would shadow the `kernels` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import save_file

from bench.measure import LoadShape, Result, add_out, bench_parser, best_of, run_benchmark
from bench.serving import WORK, make_engine, prepare, report, run_rounds, synthetic_artifacts
from compressor.checkpoint import Checkpoint
from compressor.lora import import_lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASKS = 16
LOAD = LoadShape(full_concurrency="1,8", quick_concurrency="8", quick_max_tokens=16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the synthetic adapters")
    p.add_argument("--ratio", type=float, default=32.0, help="ImPart compression ratio of the synthetic artifacts")
    p.add_argument("--distinct", type=int, default=2, help="distinct ImPart artifacts (reused round-robin)")
    LOAD.add(p)
    add_out(p, "lora")
    return LOAD.resolve(p.parse_args(argv))


def write_synthetic_adapter(base: Path, out: Path, rank: int, seed: int) -> Path:
    """A PEFT-format adapter folder (adapter_config.json + adapter_model.safetensors) of random rank-`rank`
    factors on every projection of `base`, sized like a trained adapter's (B A * alpha/r ~ 1% of W)."""
    infos = Checkpoint(base).infos
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in infos.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_dim, in_dim = info.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) / in_dim**0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def task_folder(base: Path, impart: Path, rank: int) -> Path:
    """l0..l15 (distinct LoRA artifacts) and t0..t15 (ImPart artifacts round-robin, hard links)."""
    folder = WORK / "lora-tasks"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(TASKS):
        adapter = write_synthetic_adapter(base, WORK / "adapters" / f"a{i}", rank, seed=2000 + i)
        import_lora(adapter, base, folder / f"l{i}.safetensors")
    sources = sorted(impart.glob("*.safetensors"))
    for i in range(TASKS):
        (folder / f"t{i}.safetensors").hardlink_to(sources[i % len(sources)])
    return folder


def ratios(results: list[Result]) -> dict[str, float]:
    by = {(r.scenario, r.concurrency): r.tokens_per_s for r in results}
    out = {}
    for (scenario, c), value in by.items():
        if scenario != "base":
            out[f"{scenario}/base@{c}"] = round(value / by[("base", c)], 3)
    for c in {c for _, c in by}:
        out[f"lora16/impart16@{c}"] = round(by[("lora16", c)] / by[("impart16", c)], 3)
    return out


def round_ratios(rounds: list[Result]) -> dict[str, object]:
    """The ratios inside each round (its scenarios ran back to back) and their medians: the load of a shared
    CPU drifts between rounds, so a best-of per scenario can pair a quiet round with a busy one."""
    per_round = [ratios(rounds[i : i + 3]) for i in range(0, len(rounds), 3)]
    keys = sorted(per_round[0]) if per_round else []
    return {"per_round": per_round, "median": {k: statistics.median(r[k] for r in per_round) for k in keys}}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    impart, compress_s = synthetic_artifacts(args.base, args.distinct, args.ratio)
    folder = task_folder(args.base, impart, args.rank)
    engine = make_engine(args, folder)
    await engine.start()
    plans = {"base": [None], "lora16": [f"l{i}" for i in range(TASKS)], "impart16": [f"t{i}" for i in range(TASKS)]}
    await prepare(engine, plans, args)
    rounds = await run_rounds(engine, plans, args)
    stats = engine.stats()
    await engine.stop()
    notes = [
        "scenarios interleaved per concurrency, best of --rounds rounds (the CPU is shared and its load drifts)",
        f"LoRA: {TASKS} distinct synthetic rank-{args.rank} adapters on every projection, imported exactly; "
        f"ImPart: {args.distinct} synthetic CR-{args.ratio:g} artifacts reused round-robin",
    ]
    out = report(args, best_of(rounds), rounds, stats, folder, compress_s, notes)
    out["ratios"] = ratios(best_of(rounds))
    out["round_ratios"] = round_ratios(rounds)
    out["config"]["rank"] = args.rank  # type: ignore[index]
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the LoRA benchmark and write its results."""
    run_benchmark(parse_args, main_async, argv)


if __name__ == "__main__":
    main()
