"""Publish only what can be served, at the compressor: verify_artifact refuses every crafted artifact
(re-sealed with a valid checksum) naming the module, and a checkpoint's shards stay inside its folder."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from crafted import (
    ARTIFACT_EDITS,
    QSVD_EDITS,
    SPARSE_EDITS,
    checkpoint_edits,
    craft,
    random_edit,
    raw_damage,
)
from tiny_finetunes import shard

import compressor
from compressor.merge import merge
from server.cli import main

METHODS = compressor.METHODS
MANIFEST_LEVEL = {"wrong base", "bad manifest field", "manifest a list", "manifest a string", "manifest null"}


@pytest.fixture(scope="module")
def artifacts(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base, ft = pair
    root = tmp_path_factory.mktemp("verify")
    made = {m: compressor.compress(base, ft, root / f"{m}.safetensors", method=m, ratio=8.0).out_path for m in METHODS}
    made["merge"] = merge([made["impart"], ft], base, root / "merge.safetensors").out_path
    return {m: path.read_bytes() for m, path in made.items()}


@pytest.mark.parametrize("method", [*METHODS, "merge"])
def test_every_method_and_merges_pass_the_full_check(
    method: str, artifacts: dict[str, bytes], pair: tuple[Path, Path]
) -> None:
    art = compressor.verify_artifact(artifacts[method], pair[0])
    assert art.names and all(m.shape for m in art.modules())


def _cases() -> list[tuple[str, str]]:
    return (
        [("impart", kind) for kind in ARTIFACT_EDITS]
        + [("dare", kind) for kind in SPARSE_EDITS]
        + [("impart-qt", kind) for kind in QSVD_EDITS]
        + [("dare", "nan"), ("dare-qt", "nan"), ("impart-qt", "missing factor"), ("lowrank", "inf")]
    )


@pytest.mark.parametrize("method, kind", _cases())
def test_a_crafted_artifact_is_refused_naming_what_is_wrong(
    method: str, kind: str, artifacts: dict[str, bytes], pair: tuple[Path, Path]
) -> None:
    edits = {**ARTIFACT_EDITS, **SPARSE_EDITS, **QSVD_EDITS}
    for seed in range(4):
        bad = craft(artifacts[method], edits[kind], random.Random(seed))
        with pytest.raises(compressor.ArtifactError) as refused:
            compressor.verify_artifact(bad, pair[0])
        if kind not in MANIFEST_LEVEL and kind != "extra tensor":
            assert ".weight" in str(refused.value), f"{kind}: the message must name the module: {refused.value}"


def test_raw_damage_is_refused_as_corrupt(artifacts: dict[str, bytes], pair: tuple[Path, Path]) -> None:
    rng = random.Random(0)
    kinds = set()
    for _ in range(50):
        kind, bad = raw_damage(artifacts["impart-qt"], rng)
        kinds.add(kind)
        with pytest.raises(compressor.ArtifactError):
            compressor.verify_artifact(bad, pair[0])
    assert len(kinds) == 5


def test_a_decode_checks_what_it_makes(artifacts: dict[str, bytes]) -> None:
    """A singular value of 1e30 is finite as stored, so load_artifact accepts the bytes; the module's
    decode (what the engine unpacks) refuses it."""
    for seed in range(3):
        art = compressor.load_artifact(
            craft(artifacts["impart"], ARTIFACT_EDITS["beyond the servable range"], random.Random(seed))
        )
        with pytest.raises(compressor.InvalidArtifactError, match="servable"):
            for module in art.modules():
                module.dense() if module.kind == "dense" else module.factors()


@pytest.fixture()
def sharded(pair: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A sharded fine-tune folder and a readable safetensors file outside it (a sibling folder)."""
    folder = shard(pair[1], tmp_path / "ft-sharded")
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    shutil.copy(pair[1] / "model.safetensors", outside)
    return folder, outside


@pytest.mark.parametrize("kind", list(checkpoint_edits(Path("/x/model.safetensors"))))
def test_a_checkpoint_reads_only_its_own_files(kind: str, sharded: tuple[Path, Path], pair: tuple[Path, Path]) -> None:
    folder, outside = sharded
    compressor.check_compatible(pair[0], folder)
    checkpoint_edits(outside)[kind](folder)
    with pytest.raises(compressor.IncompatibleCheckpointError) as refused:
        compressor.check_compatible(pair[0], folder)
    message = str(refused.value)
    entry = "config.json" if kind.startswith("config") else "model.safetensors.index.json"
    assert message.startswith("the fine-tune: ") and entry in message, message
    assert str(folder) not in message


@pytest.mark.parametrize("outside_name", ["/etc/hostname", "../elsewhere/model.safetensors"])
def test_a_refusal_tells_nothing_about_paths_outside(
    outside_name: str, sharded: tuple[Path, Path], pair: tuple[Path, Path]
) -> None:
    """The same words whether the named path exists or not: the name alone is refused."""
    folder, outside = sharded
    messages = []
    for name in (outside_name, outside_name + ".missing"):
        checkpoint_edits(outside)["not uploaded"](folder)
        index = folder / "model.safetensors.index.json"
        index.write_text(index.read_text().replace("model-00009-of-00009.safetensors", name))
        with pytest.raises(compressor.IncompatibleCheckpointError) as refused:
            compressor.check_compatible(pair[0], folder)
        messages.append(str(refused.value).replace(repr(name), "NAME"))
        index.write_text(index.read_text().replace(name, "model-00009-of-00009.safetensors"))
    assert messages[0] == messages[1] and "NAME" in messages[0]


def test_the_cli_refuses_a_shard_outside_the_folder(
    sharded: tuple[Path, Path], pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, outside = sharded
    checkpoint_edits(outside)["dot-dot"](folder)
    out = tmp_path / "never.safetensors"
    assert (
        main(["compress", "--base", str(pair[0]), "--finetuned", str(folder), "--out", str(out), "--device", "cpu"])
        == 2
    )
    assert "plain *.safetensors file name" in capsys.readouterr().err and not out.exists()


def test_a_link_inside_the_folder_is_followed(pair: tuple[Path, Path], tmp_path: Path) -> None:
    folder = shard(pair[1], tmp_path / "ft-linked")
    first = sorted(folder.glob("model-*.safetensors"))[0]
    first.rename(folder / "moved.safetensors")
    first.symlink_to(folder / "moved.safetensors")
    compressor.check_compatible(pair[0], folder)


@pytest.mark.parametrize(
    "kind",
    [
        "nan",
        "inf",
        "missing factor",
        "wrong factor shape",
        "drop index out of range",
        "beyond the servable range",
        "extra tensor",
    ],
)
def test_the_engine_never_unpacks_an_unchecked_artifact(
    kind: str, artifacts: dict[str, bytes], pair: tuple[Path, Path]
) -> None:
    """An artifact that reached the store by another way (an older server, a hand-made publish) fails
    its load with an ArtifactError (a 503 for its task only), never poisons a batch."""
    import torch

    from server.model.deltas import unpack_artifact

    good = unpack_artifact("t", artifacts["impart"], pair[0], torch.device("cpu"), torch.float32)
    assert good.factors and good.dense
    bad = craft(artifacts["impart"], ARTIFACT_EDITS[kind], random.Random(5))
    with pytest.raises(compressor.ArtifactError):
        unpack_artifact("t", bad, pair[0], torch.device("cpu"), torch.float32)


def test_random_edits_are_refused_as_artifact_errors_or_serve(
    artifacts: dict[str, bytes], pair: tuple[Path, Path]
) -> None:
    """Fuzz: any edit either raises an ArtifactError (a 400, never a 500) or leaves an artifact the
    engine unpacks (an edit of a field nothing reads)."""
    import torch

    from server.model.deltas import unpack_artifact

    refused = 0
    for seed in range(200):
        rng = random.Random(seed)
        data = craft(artifacts[rng.choice(METHODS)], random_edit, rng)
        try:
            compressor.verify_artifact(data, pair[0])
        except compressor.ArtifactError:
            refused += 1
            continue
        unpack_artifact("t", data, pair[0], torch.device("cpu"), torch.float32)
    assert refused > 50
