"""Benchmark of the compressor: time, memory, size and error of every method.

In one run, on one (base, fine-tune) pair:
  1. time and peak RSS of `compress` at CR 32 (ImPart), in a fresh process, with the truncated
     (randomised) SVD and with the full SVD;
  2. per method (impart, lowrank, dare at CR 8/16/32/64; impart-qt, dare-qt at CR_qt 16/32): the
     relative error ||D - D_hat||_F / ||D||_F and the output-space error ||(D - D_hat) x|| / ||W_ft x||
     on activations of a few real prompts, for the linear layers and for the embedding; artifact
     bytes, both ratios (paper's linear CR, whole artifact vs the dense 16-bit delta), size against
     the ideal, and what stored bitmasks would add. Each tensor's SVD is computed once for all of them.
Frobenius error is what truncated SVD minimises, so LowRank wins that column by construction and
DARE's exceeds 1 at high CR; ImPart's claim is about task scores (bench/quality.py).

    .venv/bin/python bench/compress.py --quick     # tiny pair made in-process, seconds
    .venv/bin/python bench/compress.py             # SmolLM2-135M and a fine-tune (~20 min on 2 busy cores)
    .venv/bin/python bench/compress.py --timing-only   # only the timed CR-32 compressions (~3 min)
The full run uses a testbed fine-tune from ~/.cache/deltaserve/finetunes/ when one exists (or
--finetuned DIR), else a perturbed copy of the base (low-rank + noise delta), and says which.
Results: bench/results/compress.json (compress-quick.json for --quick); docs/compressor.md has the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
    sys.path.pop(0)  # run as a script, bench/kernels.py would shadow the `kernels` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from bench.measure import RESULTS
from compressor.artifact import artifact_bytes
from compressor.budget import pre_prune
from compressor.calibration import PROMPTS as CALIBRATION_PROMPTS
from compressor.calibration import capture_inputs
from compressor.checkpoint import Checkpoint
from compressor.codec import ModuleCode, decode_dense
from compressor.methods import MethodParams, encode_dare, encode_dense, impart_code, lowrank_code
from compressor.pipeline import group_of, report_module
from compressor.qt import encode_dare_qt, impart_qt_code, qt_svd_rank
from compressor.summary import ideal_bytes, mask_bytes
from compressor.svd import top_svd

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path("~/.cache/deltaserve").expanduser()
PROMPTS = list(CALIBRATION_PROMPTS[:4])
FULL = {"plain": [8.0, 16.0, 32.0, 64.0], "qt": [16.0, 32.0]}
QUICK = {"plain": [8.0, 32.0], "qt": [16.0]}


@dataclass
class Tally:
    """Sums over one method's modules of one group (linear / embedding)."""

    err_sq: float = 0.0
    delta_sq: float = 0.0
    out_err_sq: float = 0.0
    out_ref_sq: float = 0.0
    modules: int = 0

    def add(self, err: torch.Tensor, delta: torch.Tensor, x: torch.Tensor | None, w_ft: torch.Tensor) -> None:
        self.err_sq += float(err.pow(2).sum())
        self.delta_sq += float(delta.pow(2).sum())
        self.modules += 1
        if x is not None:
            self.out_err_sq += float(_apply(err, x).pow(2).sum())
            self.out_ref_sq += float(_apply(w_ft, x).pow(2).sum())

    def row(self) -> dict[str, float]:
        rel = (self.err_sq / self.delta_sq) ** 0.5 if self.delta_sq else 0.0
        out = (self.out_err_sq / self.out_ref_sq) ** 0.5 if self.out_ref_sq else float("nan")
        return {"rel_error": rel, "output_error": out, "modules": self.modules}


@dataclass
class Config:
    method: str
    ratio: float
    codes: list[ModuleCode] = field(default_factory=list)
    tallies: dict[str, Tally] = field(default_factory=lambda: {"linear": Tally(), "embedding": Tally()})


def _apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] float -> x @ w.T; x [T] int64 token ids -> the rows w[ids] (embedding lookup)."""
    return w[x] if x.dtype == torch.int64 else x @ w.t()


def make_pair(quick: bool, finetuned: Path | None, work: Path) -> tuple[Path, Path, str]:
    """(base, fine-tune, a sentence saying what the fine-tune is)."""
    from server.model.provision import pull_smollm2
    from server.model.synthetic import write_tiny

    if quick:
        base = write_tiny(work / "tiny", seed=0)
        return base, perturb(base, work / "tiny-ft", rank=4), "tiny random Llama + perturbed copy (low-rank + noise)"
    base = pull_smollm2(CACHE / "models")
    found = finetuned or next(iter(sorted((CACHE / "finetunes").glob("*/config.json"))), None)
    if found is not None:
        folder = found if found.is_dir() else found.parent
        return base, folder, f"SmolLM2-135M-Instruct + testbed fine-tune {folder}"
    ft = CACHE / "bench" / "smollm2-perturbed"
    if not (ft / "model.safetensors").is_file():
        perturb(base, ft, rank=16)
    return base, ft, "SmolLM2-135M-Instruct + PERTURBED COPY (low-rank 16 + noise; no testbed fine-tune yet)"


def perturb(base: Path, dest: Path, rank: int, seed: int = 1) -> Path:
    """Copy base with a delta of ~1% of each weight's scale: a rank-`rank` part plus noise of equal norm."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dest, dirs_exist_ok=True)
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, w in tensors.items():
        scale = 0.01 * float(w.float().pow(2).mean().sqrt())
        if w.ndim == 2:
            low = torch.randn(w.shape[0], rank, generator=gen) @ torch.randn(rank, w.shape[1], generator=gen)
            noise = torch.randn(w.shape, generator=gen)
            tensors[name] = w + scale * (low / rank**0.5 + noise) / 2**0.5
        else:
            tensors[name] = w + scale * torch.randn(w.shape, generator=gen)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def configs(grid: dict[str, list[float]]) -> list[Config]:
    plain = [Config(m, r) for m in ("impart", "lowrank", "dare") for r in grid["plain"]]
    return plain + [Config(m, r) for m in ("impart-qt", "dare-qt") for r in grid["qt"]]


def encode_config(name: str, delta: torch.Tensor, svd: tuple, cfg: Config, seed: int) -> ModuleCode:
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    params = MethodParams(ratio=cfg.ratio, seed=seed)
    if cfg.method == "impart":
        return impart_code(name, shape, svd, params)
    if cfg.method == "lowrank":
        return lowrank_code(name, shape, svd, params)
    if cfg.method == "impart-qt":
        return impart_qt_code(name, shape, svd, params)
    return (encode_dare if cfg.method == "dare" else encode_dare_qt)(name, delta, params)


def svd_rank(shape: tuple[int, int], cfgs: list[Config]) -> int:
    """Vectors the widest configuration needs (one SVD per tensor serves all)."""
    ranks = [pre_prune(shape, c.ratio, 0.8)[0] for c in cfgs if c.method == "impart"]
    ranks += [qt_svd_rank(shape, MethodParams(ratio=c.ratio)) for c in cfgs if c.method == "impart-qt"]
    ranks += [shape[0] * shape[1] // int(c.ratio) // sum(shape) for c in cfgs if c.method == "lowrank"]
    return min(*shape, max(ranks))


def run_methods(base: Path, ft: Path, cfgs: list[Config], acts: dict[str, torch.Tensor], seed: int) -> float:
    """Encode every tensor under every configuration, tallying errors; returns the seconds spent in SVDs."""
    b, f = Checkpoint(base), Checkpoint(ft)
    svd_seconds = 0.0
    for name in tqdm(b.names, desc="methods", unit="tensor"):
        w_ft = f.tensor(name).to(torch.float32)
        delta = w_ft - b.tensor(name).to(torch.float32)
        if delta.ndim != 2:
            for cfg in cfgs:
                cfg.codes.append(encode_dense(name, delta))
            continue
        started = time.perf_counter()
        svd = top_svd(delta, svd_rank(tuple(delta.shape), cfgs), "auto", "cpu", seed)
        svd_seconds += time.perf_counter() - started
        for cfg in cfgs:
            code = encode_config(name, delta, svd, cfg, seed)
            cfg.codes.append(code)
            cfg.tallies[group_of(name, 2)].add(delta - decode_dense(code), delta, acts.get(name), w_ft)
    return svd_seconds


def summarise(cfg: Config, base: Path) -> dict[str, object]:
    reports = [report_module(c.name, torch.zeros(c.shape), c) for c in cfg.codes]
    manifest = {
        "method": cfg.method,
        "params": {"ratio": cfg.ratio},
        "base_fingerprint": "bench",
        "quality": {r.name: {"kept": r.kept, "rank": r.rank} for r in reports},
    }
    size = len(artifact_bytes(manifest, cfg.codes))
    linear = [c for c in cfg.codes if group_of(c.name, len(c.shape)) == "linear"]
    dense16 = sum(2 * torch.Size(c.shape).numel() for c in cfg.codes)
    ideal = sum(ideal_bytes(c) for c in cfg.codes)
    return {
        "method": cfg.method,
        "ratio": cfg.ratio,
        "linear_cr": sum(c.shape[0] * c.shape[1] for c in linear) / max(1, sum(c.kept for c in linear)),
        "linear_bytes_ratio": sum(2 * c.shape[0] * c.shape[1] for c in linear)
        / max(1, sum(ideal_bytes(c) for c in linear)),
        "whole_ratio": dense16 / size,
        "artifact_bytes": size,
        "ideal_bytes": ideal,
        "over_ideal": size / ideal,
        "bitmask_bytes": sum(mask_bytes(c) for c in cfg.codes),
        "embedding_bytes": sum(ideal_bytes(c) for c in cfg.codes if group_of(c.name, len(c.shape)) == "embedding"),
        "linear": cfg.tallies["linear"].row(),
        "embedding": cfg.tallies["embedding"].row(),
    }


TIMED = """
import resource, sys, time, torch
torch.set_num_threads({threads})
from compressor import compress
t = time.perf_counter()
r = compress({base!r}, {ft!r}, {out!r}, method="impart", ratio=32.0, svd={svd!r})
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, r.artifact_bytes)
"""


def timed_compress(base: Path, ft: Path, work: Path, svd: str, threads: int) -> dict[str, float]:
    """Compress at CR 32 in a fresh process: wall seconds and that process's peak RSS."""
    code = TIMED.format(
        base=str(base), ft=str(ft), out=str(work / f"timed-{svd}.safetensors"), svd=svd, threads=threads
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    seconds, rss, size = done.stdout.split()[-3:]
    return {"svd": svd, "seconds": float(seconds), "peak_rss_bytes": int(rss), "artifact_bytes": int(size)}


def print_table(rows: list[dict[str, object]]) -> None:
    print(
        "| method | CR | linear CR | whole ratio | artifact bytes | x ideal | bitmask would add | "
        "rel err (linear) | output err (linear) | rel err (emb) | output err (emb) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lin, emb = r["linear"], r["embedding"]
        print(
            f"| {r['method']} | {r['ratio']:g} | {r['linear_cr']:.2f} | {r['whole_ratio']:.2f} | {r['artifact_bytes']:,} | "
            f"{r['over_ideal']:.3f} | {r['bitmask_bytes']:,} | {lin['rel_error']:.3f} | {lin['output_error']:.4f} | "
            f"{emb['rel_error']:.3f} | {emb['output_error']:.4f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny pair, two ratios, seconds")
    parser.add_argument("--finetuned", type=Path, default=None, help="fine-tuned SmolLM2 folder to use")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on this shared 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="rerun only the timed compressions and update them in the existing results file",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / ("compress-quick.json" if args.quick else "compress.json")
    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as tmp:
        work = Path(tmp)
        base, ft, pair_note = make_pair(args.quick, args.finetuned, work)
        print(f"pair: {pair_note}")
        timings = [timed_compress(base, ft, work, svd, args.threads) for svd in ("auto", "full")]
        for t in timings:
            print(
                f"compress impart CR 32, svd={t['svd']}: {t['seconds']:.1f} s, peak RSS {t['peak_rss_bytes'] / 2**20:.0f} MiB"
            )
        if args.timing_only:
            out.write_text(json.dumps({**json.loads(out.read_text()), "compress_cr32": timings}, indent=1) + "\n")
            print(f"updated compress_cr32 in {out}")
            return 0
        cfgs = configs(QUICK if args.quick else FULL)
        svd_seconds = run_methods(base, ft, cfgs, capture_inputs(ft, PROMPTS), args.seed)
        rows = [summarise(cfg, base) for cfg in cfgs]
    print_table(rows)
    result = {
        "pair": pair_note,
        "quick": args.quick,
        "threads": args.threads,
        "host": platform.node(),
        "torch": torch.__version__,
        "compress_cr32": timings,
        "svd_seconds_all_methods": svd_seconds,
        "prompts": PROMPTS,
        "methods": rows,
        "reproduce": ".venv/bin/python bench/compress.py" + (" --quick" if args.quick else ""),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
