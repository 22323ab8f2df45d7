"""The cells of the quality table and the runner that fills them (compress, merge, evaluate; cached).

A cell is one (task, model) score: model is "base", "finetune", a compression method at a ratio and
seed (with ImPart's beta and C), or a merge of every task's delta. Artifacts and scores are cached
under ~/.cache/deltaserve/quality, keyed by everything that determines them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.measure import DEFAULT_BASE
from bench.testbed.evaluate import base_state_dict, evaluate, load_model, load_weights
from bench.testbed.finetune import FINETUNE_CACHE, REPORT, TRAIN_STEPS, TrainConfig, finetune
from bench.testbed.tasks import SPLIT_SIZES, TASKS, make_splits
from compressor import compress, load_artifact
from compressor.merge import merge
from compressor.search import TUNABLE

QUALITY_CACHE = Path("~/.cache/deltaserve/quality").expanduser()
TUNED_METHODS = tuple(TUNABLE)
"""Methods with (beta, C) picked on the validation split: those the compressor's search tunes."""
DETERMINISTIC_METHODS = ("lowrank",)
MERGE_SCALE = {"ta": 0.5, "ties": 1.0}
TIES_DENSITY = 0.2


@dataclass(frozen=True)
class Grid:
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    qt_ratios: tuple[float, ...]
    seeds: int
    beta_c: tuple[tuple[float, float], ...]
    merge_ratio: float
    merge: bool
    merge_sources: tuple[str, ...] = ("none", "dare", "impart")
    """Which deltas are merged: the unprocessed fine-tunes ("none"), or their DARE / ImPart artifacts."""
    merge_hows: tuple[str, ...] = ("ta", "ties")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def method_ratios(self) -> list[tuple[str, float]]:
        plain = [(m, r) for m in self.methods for r in self.ratios]
        return plain + [(f"{m}-qt", r) for m in ("impart", "dare") if m in self.methods for r in self.qt_ratios]

    def seeds_of(self, method: str) -> range:
        return range(1 if method in DETERMINISTIC_METHODS else self.seeds)


@dataclass(frozen=True)
class Variant:
    """One compressed delta of one task."""

    task: str
    method: str
    ratio: float
    seed: int
    beta: float = 0.8
    c: float = 0.5

    @property
    def name(self) -> str:
        tuned = f"-b{self.beta:g}-c{self.c:g}" if self.method in TUNED_METHODS else ""
        return f"{self.task}/{self.method}-cr{self.ratio:g}-s{self.seed}{tuned}"

    def params(self) -> dict[str, float]:
        return {"beta": self.beta, "c": self.c} if self.method in TUNED_METHODS else {}


class ScoreCache:
    """Scores by key in one JSON file. Several runs may share it: each write happens under a file
    lock and merges into what is on disk, so no run drops another's scores."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scores: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str) -> float | None:
        return self.scores.get(key)

    def put(self, key: str, score: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.scores = self._read() | self.scores | {key: score}
            self.path.with_suffix(".tmp").write_text(json.dumps(self.scores, indent=0, sort_keys=True))
            self.path.with_suffix(".tmp").replace(self.path)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Work:
    """How many compressions, merges and example evaluations a grid takes."""

    compressions: int
    merges: int
    examples: int


def planned_work(grid: Grid, examples_per_split: dict[str, int]) -> Work:
    test, val = examples_per_split["test"], examples_per_split["val"]
    compressions, examples = 0, 2 * test
    for method, _ in grid.method_ratios():
        seeds = len(grid.seeds_of(method))
        candidates = len(grid.beta_c) if method in TUNED_METHODS and len(grid.beta_c) > 1 else 0
        compressions += candidates + seeds - (1 if candidates else 0)
        examples += candidates * val + seeds * test
    compressions *= len(grid.tasks)
    examples *= len(grid.tasks)
    merges = len(grid.merge_sources) * len(grid.merge_hows) if grid.merge else 0
    return Work(compressions, merges, examples + merges * test * len(grid.tasks))


class Runner:
    """Fills a Grid's cells: one resident model whose weights are swapped per cell."""

    def __init__(
        self,
        limit: int | None,
        train_missing: bool,
        base_dir: Path = DEFAULT_BASE,
        finetunes: Path = FINETUNE_CACHE,
        cache: Path = QUALITY_CACHE,
        threads: int = 1,
        cached_only: bool = False,
    ) -> None:
        torch.set_num_threads(threads)
        self.base_dir, self.finetunes, self.cache = base_dir, finetunes, cache
        self.limit, self.train_missing, self.cached_only = limit, train_missing, cached_only
        self.missing = 0
        """Cells a cached-only run found no score for (left out of its results)."""
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.model = load_model(base_dir)
        self.base_weights = base_state_dict(base_dir)
        self.scores = ScoreCache(cache / "scores.json")
        self.timing: dict[str, list[float]] = {"compress_s": [], "merge_s": [], "eval_s_per_example": []}

    def run(self, grid: Grid) -> dict[str, object]:
        """Every cell of the grid (computed where not cached, unless cached_only), as the report reads them."""
        if not self.cached_only:
            self.warm(grid)
        tasks = [task for task in grid.tasks if self.finetune_dir(task) is not None]
        results: dict[str, object] = {"tasks": [], "base": {}, "finetune": {}, "selected": {}, "rows": []}
        for task in tasks:
            base = self.score(f"base|{task}", task, "test", lambda: self.base_weights)
            tuned = self.finetune_dir(task)
            finetuned = self.score(f"ft-{self.tag(task)}|{task}", task, "test", lambda: base_state_dict(tuned))
            if base is None or finetuned is None:
                continue
            results["tasks"].append(task)
            results["base"][task], results["finetune"][task] = base, finetuned
            for method, ratio in grid.method_ratios():
                row = self.method_row(task, method, ratio, grid, results["selected"])
                if row is not None:
                    results["rows"].append(row)
        results["merging"] = self.run_merging(results["tasks"], grid) if grid.merge else []
        results["timing"] = self.timing_summary(grid)
        results["missing_cells"] = self.missing
        return results

    def warm(self, grid: Grid) -> None:
        """Fill the cache breadth first, so a run stopped early leaves a usable table for a cached-only
        report: base and fine-tune of every task, then seed 0 of every cell, the merges, the other seeds."""
        tasks = [task for task in grid.tasks if self.finetune_dir(task) is not None]
        for task in tasks:
            self.score(f"base|{task}", task, "test", lambda: self.base_weights)
            tuned = self.finetune_dir(task)
            self.score(f"ft-{self.tag(task)}|{task}", task, "test", lambda: base_state_dict(tuned))
        first = replace(grid, seeds=1)
        for task in tasks:
            for method, ratio in grid.method_ratios():
                self.method_row(task, method, ratio, first, {})
        if grid.merge:
            self.run_merging(tasks, grid)

    def method_row(self, task: str, method: str, ratio: float, grid: Grid, selected: dict) -> dict[str, object] | None:
        beta, c = self.select(task, method, ratio, grid, selected)
        seeds = list(grid.seeds_of(method))
        scored = [(seed, self.score_variant(Variant(task, method, ratio, seed, beta, c), "test")) for seed in seeds]
        scored = [(seed, score) for seed, score in scored if score is not None]
        if not scored:
            return None
        scores = [score for _, score in scored]
        mean, std = mean_std(scores)
        return {
            "task": task,
            "method": method,
            "ratio": ratio,
            "beta": beta,
            "c": c,
            "seeds": [seed for seed, _ in scored],
            "planned_seeds": len(seeds),
            "scores": scores,
            "mean": mean,
            "std": std,
        }

    def select(self, task: str, method: str, ratio: float, grid: Grid, selected: dict) -> tuple[float, float]:
        """(beta, C) with the best validation score at seed 0; the first candidate when only one (or,
        cached-only, when no candidate was scored)."""
        if method not in TUNED_METHODS or len(grid.beta_c) == 1:
            return grid.beta_c[0]
        scored = {bc: self.score_variant(Variant(task, method, ratio, 0, *bc), "val") for bc in grid.beta_c}
        val = {bc: score for bc, score in scored.items() if score is not None}
        if not val:
            return grid.beta_c[0]
        best = max(val, key=lambda bc: val[bc])
        selected[f"{task}/{method}@{ratio:g}"] = {
            "beta": best[0],
            "c": best[1],
            "val": {f"{b:g}:{c:g}": s for (b, c), s in val.items()},
        }
        return best

    def finetune_dir(self, task: str) -> Path | None:
        folder = self.finetunes / task
        if (folder / "model.safetensors").is_file():
            return folder
        if not self.train_missing:
            print(f"skipping {task}: no fine-tune in {folder} (run python -m bench.testbed.finetune --task {task})")
            return None
        return finetune(
            TrainConfig(task, steps=TRAIN_STEPS.get(task, TrainConfig.steps)), self.base_dir, self.finetunes
        )

    def tag(self, task: str) -> str:
        """Short hash of the fine-tune's training report: cached artifacts and scores follow a retrain."""
        report = (self.finetunes / task / REPORT).read_bytes()
        return hashlib.sha256(report).hexdigest()[:10]

    def score(self, key: str, task: str, split: str, weights: Callable[[], dict[str, torch.Tensor]]) -> float | None:
        """The task's score on `split` for the model with `weights` (cached by key and example count);
        None when cached_only and it is not cached."""
        examples = make_splits(TASKS[task])[split][: self.limit]
        full_key = f"{key}|{split}|n={len(examples)}"
        cached = self.scores.get(full_key)
        if cached is not None:
            return cached
        if self.cached_only:
            self.missing += 1
            return None
        load_weights(self.model, weights())
        started = time.monotonic()
        score = evaluate(self.model, self.tokenizer, TASKS[task], examples, split).score
        self.timing["eval_s_per_example"].append((time.monotonic() - started) / len(examples))
        self.scores.put(full_key, score)
        print(f"{full_key}: {score:.3f}", flush=True)
        return score

    def score_variant(self, variant: Variant, split: str) -> float | None:
        key = f"{self.tag(variant.task)}/{variant.name}"
        return self.score(key, variant.task, split, lambda: self.merged(self.artifact(variant)))

    def merged(self, artifact: Path) -> dict[str, torch.Tensor]:
        return load_artifact(artifact, self.base_dir).merged_state_dict(self.base_weights)

    def artifact(self, variant: Variant) -> Path | None:
        path = self.cache / "artifacts" / self.tag(variant.task) / f"{variant.name.split('/')[1]}.safetensors"
        if not path.is_file() and self.cached_only:
            return None
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            compress(
                self.base_dir,
                self.finetunes / variant.task,
                path,
                method=variant.method,
                ratio=variant.ratio,
                seed=variant.seed,
                **variant.params(),
            )
            self.timing["compress_s"].append(time.monotonic() - started)
        return path

    def run_merging(self, tasks: list[str], grid: Grid) -> list[dict[str, object]]:
        """Task Arithmetic and TIES over the unprocessed, DARE and ImPart deltas of all tasks; every
        merged model scored on every task."""
        rows: list[dict[str, object]] = []
        for source in grid.merge_sources:
            inputs = [self.merge_input(task, source, grid) for task in tasks]
            if None in inputs:
                continue
            for how in grid.merge_hows:
                path = self.merge_artifact(tasks, source, how, inputs, grid.merge_ratio)
                if path is None:
                    continue
                scores = {
                    task: self.score(f"{path.stem}|{task}", task, "test", lambda: self.merged(path)) for task in tasks
                }
                if None in scores.values():
                    continue
                rows.append({"source": source, "how": how, "scores": scores, "mean": statistics.fmean(scores.values())})
        return rows

    def merge_input(self, task: str, source: str, grid: Grid) -> Path | None:
        if source == "none":
            return self.finetunes / task
        beta, c = self.select(task, source, grid.merge_ratio, grid, {})
        return self.artifact(Variant(task, source, grid.merge_ratio, 0, beta, c))

    def merge_artifact(self, tasks: list[str], source: str, how: str, inputs: list[Path], ratio: float) -> Path | None:
        inputs_tag = hashlib.sha256("|".join(str(p) + self.tag(t) for p, t in zip(inputs, tasks)).encode())
        cr = "" if source == "none" else f"-cr{ratio:g}"
        path = self.cache / "merges" / f"merge-{how}-{source}{cr}-{inputs_tag.hexdigest()[:10]}.safetensors"
        if not path.is_file() and self.cached_only:
            return None
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            merge(inputs, self.base_dir, path, how=how, scale=MERGE_SCALE[how], density=TIES_DENSITY, store="full")
            self.timing["merge_s"].append(time.monotonic() - started)
        return path

    def timing_summary(self, grid: Grid) -> dict[str, object]:
        """Seconds per step measured by this run and every earlier run on this cache (kept in
        timing.json), and the full grid's predicted time from them."""
        history = self.record_timing()
        measured = {name: statistics.fmean(values) for name, values in history.items() if values}
        work = planned_work(FULL_GRID, SPLIT_SIZES)
        unit = {"compress_s": work.compressions, "merge_s": work.merges, "eval_s_per_example": work.examples}
        known = {name: measured[name] * count for name, count in unit.items() if name in measured}
        return {
            "measured_counts": {k: len(v) for k, v in self.timing.items()},
            "history_mean": measured,
            "history_counts": {k: len(v) for k, v in history.items()},
            "full_grid_work": asdict(work),
            "full_grid_seconds_by_step": known,
            "full_grid_hours_known_steps": round(sum(known.values()) / 3600, 2),
            "unmeasured_steps": sorted(set(unit) - set(known)),
            "threads": torch.get_num_threads(),
        }

    def record_timing(self) -> dict[str, list[float]]:
        path = self.cache / "timing.json"
        history: dict[str, list[float]] = json.loads(path.read_text()) if path.is_file() else {}
        for name, values in self.timing.items():
            history[name] = history.get(name, []) + values
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(history))
        return history


FULL_GRID = Grid(
    tuple(sorted(TASKS)),
    ("impart", "dare", "lowrank"),
    (8.0, 16.0, 32.0, 64.0),
    (32.0, 64.0),
    3,
    ((0.8, 0.5), (0.6, 1.0)),
    32.0,
    True,
)
