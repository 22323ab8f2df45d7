"""The compression quality table: base, fine-tune, ImPart / DARE / LowRank / ImPart-Qt / DARE-Qt, merging.

    python bench/quality.py            # the full table (hours of CPU; see docs/quality.md)
    python bench/quality.py --quick    # the slice this repo's committed results come from

Fine-tunes are reused from ~/.cache/deltaserve/finetunes/<task> (trained first when missing, unless
--no-train). Artifacts and every score are cached under ~/.cache/deltaserve/quality, so a rerun only
computes what is new. Cells are filled breadth first (base and fine-tunes, seed 0 of every cell, the
merges, then the other seeds): a run stopped early followed by `--cached-only` reports what it reached. ImPart's (beta, C) is picked per task and CR on the validation split (seed 0);
scores are on the test split; random methods are averaged over seeds with their spread.
Writes bench/results/quality.json, quality.md, quality.png and quality_merge.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import RESULTS
from bench.testbed.quality_grid import Grid, Runner
from bench.testbed.quality_report import write_report
from bench.testbed.tasks import TASKS

QUICK = {
    "methods": ["impart", "dare", "lowrank"],
    "ratios": [32.0, 64.0],
    "qt_ratios": [],
    "seeds": 1,
    "limit": 60,
    "grid": [(0.8, 0.5)],
    "merge": True,
    "merge_sources": ["none", "impart"],
    "merge_hows": ["ta", "ties"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced slice: " + str(QUICK))
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--methods", nargs="+", default=["impart", "dare", "lowrank"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[8.0, 16.0, 32.0, 64.0])
    parser.add_argument("--qt-ratios", nargs="*", type=float, default=[32.0, 64.0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each random method")
    parser.add_argument("--limit", type=int, help="score the first N examples of each split only")
    parser.add_argument("--grid", nargs="+", default=["0.8:0.5", "0.6:1.0"], help="ImPart beta:C candidates")
    parser.add_argument("--merge-ratio", type=float, default=32.0, help="CR of the DARE / ImPart merge inputs")
    parser.add_argument("--no-merge", dest="merge", action="store_false")
    parser.add_argument(
        "--merge-sources", nargs="+", default=["none", "dare", "impart"], choices=["none", "dare", "impart"]
    )
    parser.add_argument("--merge-hows", nargs="+", default=["ta", "ties"], choices=["ta", "ties"])
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip tasks with no cached fine-tune")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="compute nothing: report the cells already scored (missing ones are left out)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for compression and decoding")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="quality", help="output file names: STEM.json, STEM.md, STEM.png")
    args = parser.parse_args(argv)
    args.grid = [tuple(float(x) for x in pair.split(":")) for pair in args.grid]
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    grid = Grid(
        tuple(args.tasks),
        tuple(args.methods),
        tuple(args.ratios),
        tuple(args.qt_ratios),
        args.seeds,
        tuple(args.grid),
        args.merge_ratio,
        args.merge,
        tuple(args.merge_sources),
        tuple(args.merge_hows),
    )
    runner = Runner(
        limit=args.limit,
        train_missing=args.train and not args.cached_only,
        threads=args.threads,
        cached_only=args.cached_only,
    )
    results = runner.run(grid)
    results["config"] = {
        "argv": sys.argv[1:],
        "quick": args.quick,
        "limit": args.limit,
        "grid": grid.as_dict(),
        "threads": args.threads,
        "cached_only": args.cached_only,
        "wall_s": round(time.monotonic() - started, 1),
    }
    for path in write_report(results, args.out, args.stem):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
