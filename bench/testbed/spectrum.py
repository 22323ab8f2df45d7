"""How low-rank are the testbed's deltas? The singular-value spectrum of W_ft - W_base per task.

    python -m bench.testbed.spectrum            # every task with a cached fine-tune

Why it matters for the quality table: ImPart's gain over LowRank comes from the long tail of the
delta's spectrum (the paper's 7B fine-tunes); if the top singular vectors a CR keeps already carry
almost all of the delta's energy, every method that keeps them scores like the fine-tune and the
methods cannot separate. For each task and each decoder-layer matrix this computes the share of
||delta||_F^2 held by the top k singular values, for k = the LowRank rank of CR 8 / 32 / 128
(k = out*in / (CR * (out + in))), and the same share for a Gaussian matrix of that shape (a flat
spectrum) as the yardstick. Writes bench/results/quality_spectrum.json and quality_spectrum.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.measure import DEFAULT_BASE, RESULTS
from bench.testbed.evaluate import base_state_dict
from bench.testbed.finetune import FINETUNE_CACHE
from bench.testbed.tasks import TASKS

RATIOS = (8.0, 32.0, 128.0)


def lowrank_rank(shape: tuple[int, int], ratio: float) -> int:
    out, inn = shape
    return max(1, int(out * inn / (ratio * (out + inn))))


def energy_share(s: torch.Tensor, k: int) -> float:
    """Share of sum(s^2) in the top k singular values."""
    e = s.double().pow(2)
    return float(e[:k].sum() / e.sum()) if e.sum() > 0 else 1.0


def task_spectrum(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], gen: torch.Generator) -> dict:
    shares: dict[str, list[float]] = {f"cr{r:g}": [] for r in RATIOS}
    flat: dict[str, list[float]] = {f"cr{r:g}": [] for r in RATIOS}
    curve: list[list[float]] = []
    for name in sorted(base):
        if ".layers." not in name or base[name].dim() != 2:
            continue
        delta = tuned[name].float() - base[name].float()
        s = torch.linalg.svdvals(delta)
        noise = torch.linalg.svdvals(torch.randn(delta.shape, generator=gen))
        for ratio in RATIOS:
            k = lowrank_rank(tuple(delta.shape), ratio)
            shares[f"cr{ratio:g}"].append(energy_share(s, k))
            flat[f"cr{ratio:g}"].append(energy_share(noise, k))
        e = s.double().pow(2)
        cumulative = (e.cumsum(0) / e.sum()).tolist()
        # the cumulative share at 1, 2, 4, ... % of the matrix's rank, for the plot
        curve.append([cumulative[max(0, int(len(cumulative) * p / 100) - 1)] for p in PERCENTS])
    return {
        "matrices": len(curve),
        "top_k_energy": {key: statistics.fmean(v) for key, v in shares.items()},
        "top_k_energy_min": {key: min(v) for key, v in shares.items()},
        "gaussian_top_k_energy": {key: statistics.fmean(v) for key, v in flat.items()},
        "cumulative_by_percent_rank": [statistics.fmean(c[i] for c in curve) for i in range(len(PERCENTS))],
    }


PERCENTS = (1, 2, 4, 8, 16, 32, 64, 100)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for task, found in results["tasks"].items():
        ax.plot(PERCENTS, [100 * v for v in found["cumulative_by_percent_rank"]], marker="o", label=task)
    ax.plot(PERCENTS, list(PERCENTS), linestyle=":", color="grey", label="flat spectrum (share = % kept)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(PERCENTS, [str(p) for p in PERCENTS])
    ax.set_xlabel("top singular values kept (% of the matrix's rank)")
    ax.set_ylabel("share of ||delta||_F^2 (%)")
    ax.set_title("Testbed deltas (mean over decoder-layer matrices)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = base_state_dict(DEFAULT_BASE)
    gen = torch.Generator().manual_seed(0)
    results: dict = {
        "command": "python -m bench.testbed.spectrum " + " ".join(argv or []),
        "ratios": list(RATIOS),
        "percents": list(PERCENTS),
        "tasks": {},
    }
    for task in args.tasks:
        folder = FINETUNE_CACHE / task
        if not (folder / "model.safetensors").is_file():
            print(f"skipping {task}: no fine-tune in {folder}")
            continue
        results["tasks"][task] = task_spectrum(base, base_state_dict(folder), gen)
        print(task, json.dumps(results["tasks"][task]["top_k_energy"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_spectrum.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "quality_spectrum.png")
    print(f"wrote {args.out / 'quality_spectrum.json'} and quality_spectrum.png")


if __name__ == "__main__":
    main()
