"""compress -> artifact -> load_artifact -> factors / dense -> merged_state_dict, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from crafted import craft, header_of, rewrite_manifest
from tiny_finetunes import perturb, shard

import compressor
from compressor.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def artifacts(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base, ft = pair
    root = tmp_path_factory.mktemp("artifacts")
    return {
        m: compressor.compress(base, ft, root / f"{m}.safetensors", method=m, ratio=8.0).out_path
        for m in ("impart", "lowrank", "dare")
    }


@pytest.mark.parametrize("method", ["impart", "lowrank", "dare"])
def test_factors_reproduce_dense_and_merged_weights_add_the_delta(
    method: str, artifacts: dict[str, Path], pair: tuple[Path, Path]
) -> None:
    base, _ = pair
    art = compressor.load_artifact(artifacts[method], base_dir=base)
    assert art.method == method
    base_sd = Checkpoint(base).state_dict()
    assert set(art.names) == set(base_sd)
    merged = art.merged_state_dict(base_sd)
    for mod in art.modules():
        assert mod.shape == tuple(base_sd[mod.name].shape)
        if mod.kind == "factors":
            u, s, v = mod.factors()
            assert u.shape[0] == mod.shape[0] and v.shape[0] == mod.shape[1] and s.shape == (u.shape[1],)
            torch.testing.assert_close((u * s) @ v.t(), mod.dense(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[mod.name], base_sd[mod.name] + mod.dense(), rtol=0, atol=1e-6)


def test_reconstruction_is_close_to_the_true_delta(artifacts: dict[str, Path], pair: tuple[Path, Path]) -> None:
    base, ft = pair
    art = compressor.load_artifact(artifacts["lowrank"])
    b, f = Checkpoint(base), Checkpoint(ft)
    name = "model.layers.0.mlp.up_proj.weight"
    delta = f.tensor(name) - b.tensor(name)
    err = torch.linalg.norm(delta - art.module(name).dense()) / torch.linalg.norm(delta)
    assert err < 0.2, "a rank-4 + small-noise delta must be well captured at CR 8"
    norm_name = "model.norm.weight"
    torch.testing.assert_close(art.module(norm_name).dense(), f.tensor(norm_name) - b.tensor(norm_name))


def test_save_load_round_trip_is_exact_and_bytes_load_like_files(artifacts: dict[str, Path]) -> None:
    path = artifacts["impart"]
    from_file, from_bytes = compressor.load_artifact(path), compressor.load_artifact(path.read_bytes())
    assert from_file.manifest == from_bytes.manifest
    for mod in from_file.modules():
        assert torch.equal(mod.dense(), from_bytes.module(mod.name).dense())


def test_compression_is_deterministic_given_a_seed(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    a = compressor.compress(base, ft, tmp_path / "a.safetensors", ratio=16.0, seed=3)
    b = compressor.compress(base, ft, tmp_path / "b.safetensors", ratio=16.0, seed=3)
    c = compressor.compress(base, ft, tmp_path / "c.safetensors", ratio=16.0, seed=4)
    load = compressor.load_artifact
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(load(a.out_path).module(name).dense(), load(b.out_path).module(name).dense())
    assert not torch.equal(load(a.out_path).module(name).dense(), load(c.out_path).module(name).dense())


def test_wrong_base_is_rejected(artifacts: dict[str, Path], tied_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from server.model.synthetic import write_tiny

    other_seed = write_tiny(tmp_path / "other", seed=7)
    with pytest.raises(compressor.WrongBaseError):
        compressor.load_artifact(artifacts["impart"], base_dir=other_seed)
    with pytest.raises(compressor.WrongBaseError):
        compressor.load_artifact(artifacts["impart"], base_dir=tied_pair[0])


def test_truncated_and_corrupt_files_are_rejected(artifacts: dict[str, Path]) -> None:
    data = artifacts["impart"].read_bytes()
    for bad in (data[: len(data) // 2], data[:5], b"", b"not an artifact at all"):
        with pytest.raises(compressor.CorruptArtifactError):
            compressor.load_artifact(bad)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    with pytest.raises(compressor.CorruptArtifactError, match="checksum"):
        compressor.load_artifact(bytes(flipped))


def test_unknown_version_and_edited_manifest_are_rejected(artifacts: dict[str, Path]) -> None:
    data = artifacts["impart"].read_bytes()
    with pytest.raises(compressor.UnsupportedVersionError):
        compressor.load_artifact(rewrite_manifest(data, {"version": 99}))
    with pytest.raises(compressor.CorruptArtifactError, match="checksum"):
        compressor.load_artifact(rewrite_manifest(data, {"method": "lowrank"}))
    assert issubclass(compressor.WrongBaseError, compressor.ArtifactError)
    assert issubclass(compressor.ArtifactError, ValueError)


def test_mask_scheme_is_written_and_another_scheme_is_refused(artifacts: dict[str, Path]) -> None:
    """The manifest names the mask rule; an artifact of another rule is refused, one naming none is read."""
    import random

    from compressor.artifact import MANIFEST_KEY
    from compressor.masks import MASK_SCHEME

    data = artifacts["impart"].read_bytes()
    assert json.loads(header_of(data)["__metadata__"][MANIFEST_KEY])["mask_scheme"] == MASK_SCHEME

    def scheme(value: str | None) -> bytes:
        def edit(manifest: dict, tensors: dict, rng: random.Random) -> None:
            manifest.pop("mask_scheme")
            if value is not None:
                manifest["mask_scheme"] = value

        return craft(data, edit, random.Random(0))

    with pytest.raises(compressor.InvalidArtifactError, match="mask_scheme"):
        compressor.load_artifact(scheme("splitmix64-rank-v2"))
    assert compressor.load_artifact(scheme(None)).names == compressor.load_artifact(data).names


def test_sharded_checkpoints_compress_like_single_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    sharded = shard(ft, tmp_path / "ft-sharded")
    one = compressor.compress(base, ft, tmp_path / "one.safetensors", ratio=8.0)
    two = compressor.compress(base, sharded, tmp_path / "two.safetensors", ratio=8.0)
    a, b = compressor.load_artifact(one.out_path), compressor.load_artifact(two.out_path)
    for mod in a.modules():
        assert torch.equal(mod.dense(), b.module(mod.name).dense())


def test_tied_embedding_delta_is_kept(tied_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = tied_pair
    report = compressor.compress(base, ft, tmp_path / "tied.safetensors", ratio=8.0)
    art = compressor.load_artifact(report.out_path, base_dir=base)
    assert "lm_head.weight" not in art.names
    emb = art.module("model.embed_tokens.weight")
    assert emb.kind == "factors" and emb.factors()[1].numel() > 0
    assert float(emb.dense().norm()) > 0


def test_progress_callback_sees_every_tensor(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    seen: list[tuple[int, int, str]] = []
    compressor.compress(base, ft, tmp_path / "p.safetensors", method="dare", progress=lambda *a: seen.append(a))
    names = Checkpoint(base).names
    assert [s[2] for s in seen] == names and seen[-1][:2] == (len(names), len(names))


def test_incompatible_checkpoints_are_rejected(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, ft = pair
    bad = perturb(base, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    cases = {
        "missing": lambda t: t.pop("model.norm.weight"),
        "extra": lambda t: t.update({"extra.weight": torch.zeros(2)}),
        "shape": lambda t: t.update({"model.norm.weight": torch.zeros(3)}),
        "dtype": lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}),
    }
    for word, edit in cases.items():
        copy = dict(tensors)
        edit(copy)
        save_file(copy, str(bad / "model.safetensors"))
        with pytest.raises(compressor.IncompatibleCheckpointError, match=word):
            compressor.check_compatible(base, bad)
    data = (ft / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(compressor.IncompatibleCheckpointError):
        compressor.check_compatible(base, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(compressor.IncompatibleCheckpointError, match="safetensors"):
        compressor.check_compatible(base, bad)
    other = perturb(base, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(compressor.IncompatibleCheckpointError, match="architecture"):
        compressor.check_compatible(base, other)


def test_embedding_can_use_its_own_method_and_ratio(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    report = compressor.compress(base, ft, tmp_path / "e.safetensors", ratio=16.0, embedding_method="full")
    art = compressor.load_artifact(report.out_path)
    emb = art.module("model.embed_tokens.weight")
    truth = Checkpoint(ft).tensor(emb.name) - Checkpoint(base).tensor(emb.name)
    torch.testing.assert_close(emb.dense(), truth, atol=1e-4, rtol=1e-3)
    assert art.module("model.layers.0.mlp.up_proj.weight").code.layout == "svd"
    lower = compressor.compress(base, ft, tmp_path / "f.safetensors", ratio=16.0, embedding_ratio=4.0)
    kept = {m.name: m.kept for m in lower.modules}
    assert kept["model.embed_tokens.weight"] == round(413 * 64 / 4.0)
    assert lower.linear_cr == pytest.approx(16.0, rel=1e-3)
    with pytest.raises(ValueError, match="unknown method parameter"):
        compressor.compress(base, ft, tmp_path / "g.safetensors", gamma=3)


def test_impart_qt_with_gptq_calibrates_on_the_fine_tune(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    report = compressor.compress(base, ft, tmp_path / "q.safetensors", method="impart-qt", ratio=8.0, gptq_prompts=2)
    art = compressor.load_artifact(report.out_path, base_dir=base)
    linear = art.module("model.layers.0.self_attn.q_proj.weight")
    assert linear.code.layout == "qsvd" and linear.code.meta["quantiser"] == "gptq-v"
    assert art.module("model.embed_tokens.weight").code.meta["quantiser"] == "rtn"
    assert report.linear_bytes_ratio == pytest.approx(8.0, rel=0.05)
    u, s, v = linear.factors()
    torch.testing.assert_close((u * s) @ v.t(), linear.dense())
