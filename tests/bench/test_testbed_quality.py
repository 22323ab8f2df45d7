"""The quality table's runner and report on the tiny model: every cell filled, work as planned,
everything cached on a rerun, goals computed, files written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testbed_fakes import low_rank_finetune

from bench.testbed.quality_grid import Grid, Runner, planned_work
from bench.testbed.quality_report import write_report

GRID = Grid(
    ("dates", "routing"), ("impart", "dare", "lowrank"), (8.0, 16.0), (), 2, ((0.8, 0.5), (0.6, 1.0)), 8.0, True
)


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Runner, dict]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quality")
    for seed, task in enumerate(GRID.tasks):
        low_rank_finetune(tiny_model, root / "finetunes" / task, seed=seed + 5)
    runner = Runner(
        limit=3, train_missing=False, base_dir=tiny_model, finetunes=root / "finetunes", cache=root / "cache"
    )
    return root, runner, runner.run(GRID)


def test_every_method_ratio_and_task_has_a_row_with_its_seeds(run: tuple[Path, Runner, dict]) -> None:
    _, _, results = run
    cells = {(r["task"], r["method"], r["ratio"]): r for r in results["rows"]}
    assert len(cells) == len(results["rows"]) == 2 * 3 * 2
    assert cells["dates", "dare", 8.0]["seeds"] == [0, 1] and cells["dates", "lowrank", 8.0]["seeds"] == [0]
    assert all(0.0 <= score <= 1.0 for r in results["rows"] for score in r["scores"])
    assert set(results["selected"]) == {f"{t}/impart@{r:g}" for t in GRID.tasks for r in GRID.ratios}


def test_the_runner_does_the_planned_compressions_and_merges(run: tuple[Path, Runner, dict]) -> None:
    _, runner, results = run
    work = planned_work(GRID, {"test": 3, "val": 3})
    assert results["timing"]["measured_counts"]["compress_s"] == work.compressions == 2 * (2 * 3 + 2 * 2 + 2)
    assert results["timing"]["measured_counts"]["merge_s"] == work.merges == 6
    assert [(m["how"], m["source"]) for m in results["merging"]] == [
        (how, source) for source in ("none", "dare", "impart") for how in ("ta", "ties")
    ]
    merge_keys = [key for key in runner.scores.scores if key.startswith("merge-")]
    assert len(merge_keys) == 6 * len(GRID.tasks), "each merged model is scored on each task"


def test_a_rerun_reuses_every_artifact_and_score(run: tuple[Path, Runner, dict], tiny_model: Path) -> None:
    root, _, results = run
    again = Runner(
        limit=3, train_missing=False, base_dir=tiny_model, finetunes=root / "finetunes", cache=root / "cache"
    )
    rerun = again.run(GRID)
    assert rerun["rows"] == results["rows"] and rerun["merging"] == results["merging"]
    assert all(not values for values in again.timing.values())


def test_report_writes_json_markdown_and_plots_with_the_goals(run: tuple[Path, Runner, dict], tmp_path: Path) -> None:
    _, _, results = run
    results["config"] = {"argv": ["--test"], "limit": 3, "wall_s": 1.0}
    paths = write_report(results, tmp_path)
    assert sorted(p.name for p in paths) == ["quality.json", "quality.md", "quality.png", "quality_merge.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths if p.suffix == ".png")
    assert {"impart@16 >= dare@8", "impart@16 >= lowrank@8", "ties+impart > ties"} <= set(results["goals"])
    markdown = (tmp_path / "quality.md").read_text()
    assert "| dates |" in markdown and "| ties | impart |" in markdown


def test_two_score_caches_on_one_file_keep_each_others_scores(tmp_path: Path) -> None:
    from bench.testbed.quality_grid import ScoreCache

    first, second = ScoreCache(tmp_path / "scores.json"), ScoreCache(tmp_path / "scores.json")
    first.put("a", 0.5)
    second.put("b", 0.25)
    assert ScoreCache(tmp_path / "scores.json").scores == {"a": 0.5, "b": 0.25}


def test_cells_are_filled_breadth_first(
    run: tuple[Path, Runner, dict], tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 0 of every cell and the merges come before any second seed: a run stopped early still
    leaves every cell with one score."""
    root, _, _ = run
    again = Runner(
        limit=3, train_missing=False, base_dir=tiny_model, finetunes=root / "finetunes", cache=root / "cache"
    )
    order: list[str] = []
    real = again.score

    def record(key: str, *args: object) -> float | None:
        order.append(key)
        return real(key, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(again, "score", record)
    again.run(GRID)
    first_second_seed = next(i for i, key in enumerate(order) if "-s1" in key)
    assert all("-s1" not in key for key in order[:first_second_seed])
    assert any(key.startswith("merge-") for key in order[:first_second_seed])
    assert {key.split("/")[1] for key in order[:first_second_seed] if "-s0" in key} >= {"dates", "routing"}


def test_cached_only_reports_what_is_scored_and_computes_nothing(
    run: tuple[Path, Runner, dict], tiny_model: Path, tmp_path: Path
) -> None:
    root, _, _ = run
    bigger = Grid(GRID.tasks, GRID.methods, (8.0, 16.0, 32.0), (), 3, GRID.beta_c, 8.0, True)
    runner = Runner(
        limit=3,
        train_missing=False,
        base_dir=tiny_model,
        finetunes=root / "finetunes",
        cache=root / "cache",
        cached_only=True,
    )
    results = runner.run(bigger)
    assert all(not values for values in runner.timing.values()), "nothing compressed, merged or decoded"
    assert {r["ratio"] for r in results["rows"]} == {8.0, 16.0}
    dare = next(r for r in results["rows"] if r["method"] == "dare")
    assert dare["seeds"] == [0, 1] and dare["planned_seeds"] == 3
    assert results["missing_cells"] > 0 and len(results["merging"]) == 6
    results["config"] = {"argv": ["--cached-only"], "limit": 3, "wall_s": 1.0}
    write_report(results, tmp_path)
    markdown = (tmp_path / "quality.md").read_text()
    assert "(n=2)" in markdown and "not computed yet" in markdown
