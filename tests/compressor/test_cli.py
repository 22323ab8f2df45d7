"""The CLI end to end on a tiny pair: compress, inspect, reconstruct, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compressor
from compressor.checkpoint import Checkpoint
from compressor.merge import task_arithmetic, ties
from server.cli import main


def test_compress_inspect_reconstruct(pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, ft = pair
    out = tmp_path / "task.safetensors"
    assert (
        main(
            [
                "compress",
                "--base",
                str(base),
                "--finetuned",
                str(ft),
                "--out",
                str(out),
                "--method",
                "impart",
                "--ratio",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "linear CR 8.00" in capsys.readouterr().out
    assert main(["inspect", str(out), "--base", str(base), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "impart" and summary["linear_cr"] == pytest.approx(8.0, rel=1e-3)
    assert summary["whole_ratio"] == pytest.approx(summary["dense_delta_bytes"] / out.stat().st_size)
    assert main(["inspect", str(out), "--modules"]) == 0
    assert "model.layers.1.mlp.down_proj.weight" in capsys.readouterr().out
    rec = tmp_path / "rec"
    assert main(["reconstruct", str(out), "--base", str(base), "--out", str(rec)]) == 0
    merged = compressor.load_artifact(out).merged_state_dict(Checkpoint(base).state_dict())
    written = Checkpoint(rec).state_dict()
    assert (rec / "config.json").is_file() and (rec / "tokenizer.json").is_file()
    for name, tensor in merged.items():
        assert torch.equal(written[name], tensor)


def test_cli_reports_bad_input_with_exit_code_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = pair
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert main(["inspect", str(tmp_path / "junk.safetensors")]) == 2
    assert main(["compress", "--base", str(base), "--finetuned", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_merge_ta_and_ties_from_artifacts_and_folders(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, ft = pair
    art = tmp_path / "a.safetensors"
    compressor.compress(base, ft, art, method="dare", ratio=4.0)
    out = tmp_path / "merged.safetensors"
    assert (
        main(["merge", str(art), str(ft), "--base", str(base), "--out", str(out), "--how", "ta", "--scale", "0.5"]) == 0
    )
    merged = compressor.load_artifact(out, base_dir=base)
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = Checkpoint(ft).tensor(name) - Checkpoint(base).tensor(name)
    expected = 0.5 * (compressor.load_artifact(art).module(name).dense() + raw)
    assert merged.method == "merge-ta" and merged.module(name).kind == "factors"
    torch.testing.assert_close(merged.module(name).dense(), expected, atol=1e-4, rtol=1e-3)
    assert (
        main(
            [
                "merge",
                str(art),
                str(ft),
                "--base",
                str(base),
                "--out",
                str(out),
                "--how",
                "ties",
                "--store",
                "impart",
                "--ratio",
                "8",
            ]
        )
        == 0
    )
    assert compressor.load_artifact(out).manifest["params"]["store"] == "impart"


def test_ties_elects_the_sign_and_averages_agreeing_entries() -> None:
    a = torch.tensor([1.0, -2.0, 0.1, 3.0])
    b = torch.tensor([3.0, 1.0, -0.1, -0.5])
    assert torch.equal(task_arithmetic([a, b], 1.0), a + b)
    merged = ties([a, b], density=1.0, scale=1.0)
    torch.testing.assert_close(merged, torch.tensor([2.0, -2.0, 0.0, 3.0]))
    trimmed = ties([a, b], density=0.5, scale=2.0)  # a -> [0, -2, 0, 3], b -> [3, 1, 0, 0]
    torch.testing.assert_close(trimmed, torch.tensor([6.0, -4.0, 0.0, 6.0]))


def test_method_lists_come_from_the_encoder_table() -> None:
    """METHODS is the encoder table less the whole (uncompressed) encoding; the CLI offers exactly those."""
    import argparse

    from compressor.cli import register
    from compressor.pipeline import ENCODERS, WHOLE
    from compressor.search import TUNABLE

    assert compressor.METHODS == ("impart", "dare", "lowrank", "impart-qt", "dare-qt")
    assert {*compressor.METHODS, WHOLE} == set(ENCODERS)
    assert set(compressor.ADAPTER_METHODS) <= set(compressor.METHODS)
    assert set(TUNABLE) <= set(compressor.METHODS)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    choices = {
        (cmd, a.dest): tuple(a.choices)
        for cmd, p in sub.choices.items()
        for a in p._actions
        if a.dest in ("method", "embedding_method", "store") and a.choices
    }
    assert choices[("compress", "method")] == compressor.METHODS
    assert choices[("compress", "embedding_method")] == (*compressor.METHODS, WHOLE)
    assert choices[("merge", "store")] == (*compressor.METHODS, WHOLE)
    assert choices[("import-lora", "method")] == compressor.ADAPTER_METHODS
