"""bench/measure.py owns what the benchmarks share: the results folder, the default base, the parser
shapes, the asyncio main and how a results file records a path. Every benchmark's defaults come from it."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
from pathlib import Path

import pytest

from bench import measure, serving
from bench.measure import DEFAULT_BASE, RESULTS, LoadShape, Result, repo_path, run_benchmark
from server.config import Settings

REPO = Path(__file__).resolve().parents[2]

# script -> results file it writes by default
OUTPUTS = {
    "prefix": "prefix.json",
    "structured": "structured.json",
    "serving": "serving.json",
    "lora": "lora.json",
    "serving_vllm": "serving_vllm.json",
    "kernel_step": "kernel_step.json",
    "load": "load.json",
    "fuzz_http": "fuzz_http.json",
}
WITH_BASE = ("prefix", "structured", "serving", "lora", "serving_vllm", "kernel_step")


def test_results_live_in_the_repository_bench_folder() -> None:
    assert RESULTS.resolve() == REPO / "bench" / "results"


def test_the_default_base_is_where_the_server_provisions_smollm2() -> None:
    fields = Settings.model_fields
    assert fields["base_model"].default == DEFAULT_BASE.name == "smollm2"
    assert fields["model_cache"].default.expanduser() / "smollm2" == DEFAULT_BASE


@pytest.mark.parametrize("script", sorted(OUTPUTS))
def test_every_benchmark_takes_its_defaults_from_measure(script: str) -> None:
    args = importlib.import_module(f"bench.{script}").parse_args([])
    assert args.out == RESULTS / OUTPUTS[script]
    if script in WITH_BASE:
        assert args.base == DEFAULT_BASE


def test_engine_options_and_out() -> None:
    p = measure.bench_parser("doc")
    measure.add_engine_options(p, threads=1)
    measure.add_out(p, "x")
    args = p.parse_args([])
    assert (args.base, args.threads, args.device, args.out) == (DEFAULT_BASE, 1, "cpu", RESULTS / "x.json")
    assert p.parse_args(["--threads", "3", "--device", "cuda"]).threads == 3


def test_load_shape_fills_what_quick_decides() -> None:
    shape = LoadShape(full_concurrency="1,8", quick_concurrency="8", quick_max_tokens=16)
    p = argparse.ArgumentParser()
    shape.add(p)
    full = shape.resolve(p.parse_args([]))
    quick = shape.resolve(p.parse_args(["--quick"]))
    given = shape.resolve(p.parse_args(["--quick", "--concurrency", "2,3", "--max-tokens", "5"]))
    assert (full.concurrency, full.prompt_len, full.max_tokens) == ([1, 8], 64, 32)
    assert (quick.concurrency, quick.prompt_len, quick.max_tokens) == ([8], 32, 16)
    assert (given.concurrency, given.max_tokens) == ([2, 3], 5)
    assert (full.threads, full.device, full.waves, full.rounds) == (0, "cpu", 2, 2)


def test_repo_path_is_relative_inside_the_repository_only(tmp_path: Path) -> None:
    assert repo_path(RESULTS / "prefix.json") == "bench/results/prefix.json"
    assert repo_path(tmp_path / "x.json") == str(tmp_path / "x.json")


def test_run_benchmark_writes_the_results_and_prints_the_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "r.json"

    def parse(argv: list[str] | None) -> argparse.Namespace:
        return argparse.Namespace(out=out, argv=argv)

    async def run(args: argparse.Namespace) -> dict[str, object]:
        return {"argv": args.argv, "ratios": {"a/b": 1.5}}

    run_benchmark(parse, run, ["--x"])
    assert json.loads(out.read_text()) == {"argv": ["--x"], "ratios": {"a/b": 1.5}}
    printed = capsys.readouterr().out
    assert '"a/b": 1.5' in printed and f"wrote {out}" in printed


def test_show_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    measure.show(Result("base", 8, 16, 256, 2.0, 128.0, 10.0, 50.0), [1.0])
    line = capsys.readouterr().out.strip()
    assert line.endswith(" [1.0]")
    assert json.loads(line.removesuffix(" [1.0]"))["scenario"] == "base"


def test_run_rounds_interleaves_scenarios_then_the_extra_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/serving.py's rounds loop (serving and lora use it): per concurrency, --rounds rounds, each
    every scenario in order and then the extra one."""

    async def fake_deltas(engine: object, name: str, tasks: list[str | None], c: int, args: object) -> Result:
        return Result(name, c, 1, 1, 1.0, 1.0, 0.0, 0.0)

    async def extra(c: int) -> Result:
        return Result("swap16", c, 1, 1, 1.0, 1.0, 0.0, 0.0)

    monkeypatch.setattr(serving, "run_deltas", fake_deltas)
    args = argparse.Namespace(concurrency=[1, 8], rounds=2)
    plans: dict[str, list[str | None]] = {"base": [None], "one": ["t0"]}
    got = asyncio.run(serving.run_rounds(None, plans, args, extra))
    expected = [(s, c) for c in (1, 8) for _ in range(2) for s in ("base", "one", "swap16")]
    assert [(r.scenario, r.concurrency) for r in got] == expected
    plain = asyncio.run(serving.run_rounds(None, plans, args))
    assert [r.scenario for r in plain] == ["base", "one"] * 4
