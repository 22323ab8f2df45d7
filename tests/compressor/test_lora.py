"""PEFT LoRA adapters imported as artifacts (method lora): exact against peft's merged weights, refusals
naming the field, the verify_artifact checks of the lora layout, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from crafted import seal
from peft_adapters import RICH, peft_merged, write_adapter
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from compressor import InvalidArtifactError, load_artifact, verify_artifact
from compressor.artifact import MANIFEST_KEY
from compressor.errors import AdapterError
from compressor.lora import import_lora
from server.cli import main
from server.model.llama import load_state_dict

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def rich(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_adapter(pair[0], tmp_path_factory.mktemp("lora") / "rich", seed=3, **RICH)


def _max_weight_gap(base: Path, adapter: Path, artifact: Path) -> float:
    merged = load_artifact(artifact, base).merged_state_dict(load_state_dict(base, torch.device("cpu"), torch.float32))
    reference = peft_merged(base, adapter).state_dict()
    return max(float((reference[k] - merged[k]).abs().max()) for k in merged)


def test_rich_adapter_equals_peft_merge_and_unload(pair: tuple[Path, Path], rich: Path, tmp_path: Path) -> None:
    report = import_lora(rich, pair[0], tmp_path / "a.safetensors")
    layouts = {m.name: (m.layout, m.rank) for m in report.modules}
    assert layouts["model.layers.0.self_attn.v_proj.weight"] == ("lora", 2)  # rank_pattern
    assert layouts["model.layers.1.mlp.down_proj.weight"] == ("lora", 6)
    assert layouts["model.layers.0.mlp.down_proj.weight"] == ("lora", 4)
    assert layouts["model.embed_tokens.weight"] == ("lora", 4)  # lora_embedding_A/B
    assert layouts["lm_head.weight"] == ("full", 0)  # modules_to_save
    assert len(layouts) == 2 * 7 + 2
    verify_artifact(tmp_path / "a.safetensors", pair[0])
    assert _max_weight_gap(pair[0], rich, tmp_path / "a.safetensors") < 1e-5


def test_regex_targets_on_a_tied_base(tied_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base = tied_pair[0]
    adapter = write_adapter(
        base,
        tmp_path / "ad",
        seed=4,
        r=3,
        lora_alpha=6,
        target_modules=r".*\.(q_proj|down_proj)",
        alpha_pattern={"layers.0.self_attn.q_proj": 1},
    )
    report = import_lora(adapter, base, tmp_path / "a.safetensors")
    assert {m.name.rsplit(".", 2)[-2] for m in report.modules} == {"q_proj", "down_proj"}
    assert _max_weight_gap(base, adapter, tmp_path / "a.safetensors") < 1e-5


def test_fused_projection_names_split_into_the_bases_parts(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """An adapter of a fused-qkv architecture: B's rows split into q, k, v; A shared."""
    base = pair[0]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=gen), torch.randn(64 + 32 + 32, 2, generator=gen)
    folder = tmp_path / "fused"
    folder.mkdir()
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": a,
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight": b,
        },
        str(folder / WEIGHTS),
    )
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"]}))
    art = load_artifact(import_lora(folder, base, tmp_path / "a.safetensors").out_path, base)
    expected = (b @ a * 2.0).split([64, 32, 32])
    for part, delta in zip(("q", "k", "v"), expected):
        got = art.module(f"model.layers.0.self_attn.{part}_proj.weight").dense()
        assert torch.allclose(got, delta, atol=1e-6)


def _edited(rich: Path, tmp: Path, config: dict | None = None, weights: dict | None = None) -> Path:
    folder = tmp / "edited"
    shutil.copytree(rich, folder)
    if config is not None:
        raw = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if weights is not None:
        save_file(weights, str(folder / WEIGHTS))
    return folder


def _renamed(rich: Path, old: str, new: str) -> dict[str, torch.Tensor]:
    return {k.replace(old, new): v for k, v in load_file(str(rich / WEIGHTS)).items()}


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"r": "4"}, "r"),
        ({"lora_alpha": None}, "lora_alpha"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"rank_pattern": {"v_proj": 3}}, "rank_pattern"),
        ({"rank_pattern": ["v_proj"]}, "rank_pattern"),
        ({"alpha_pattern": []}, "alpha_pattern"),
        ({"alpha_pattern": {"(": 2}}, "alpha_pattern"),
        ({"target_modules": 5}, "target_modules"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"lora_bias": True}, "lora_bias"),
        # catastrophic backtracking on every module name: refused within the match timeout, not a hang
        ({"alpha_pattern": {"(.*){1,32000}[bc]": 2}}, "alpha_pattern"),
    ],
)
def test_unsupported_or_malformed_config_is_refused_naming_the_field(
    pair: tuple[Path, Path], rich: Path, tmp_path: Path, config: dict, field: str
) -> None:
    with pytest.raises(AdapterError) as refused:
        import_lora(_edited(rich, tmp_path, config=config), pair[0], tmp_path / "a.safetensors")
    assert refused.value.field == field
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("text", ["[]", "null", '"r"', "{", "[" * 100_000])
def test_config_that_is_not_an_object_is_refused(
    pair: tuple[Path, Path], rich: Path, tmp_path: Path, text: str
) -> None:
    folder = _edited(rich, tmp_path)
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError) as refused:
        import_lora(folder, pair[0], tmp_path / "a.safetensors")
    assert refused.value.field == "adapter_config.json"


def test_weights_that_do_not_fit_the_base_are_refused(pair: tuple[Path, Path], rich: Path, tmp_path: Path) -> None:
    cases = {
        "target_modules": _renamed(rich, "layers.1.self_attn.q_proj", "layers.1.self_attn.x_proj"),
        "modules_to_save": _renamed(rich, "base_model.model.lm_head", "base_model.model.head2"),
    }
    weights = load_file(str(rich / WEIGHTS))
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    cases[WEIGHTS] = {**weights, key: torch.zeros(4, 65)}
    cases["lora_bias"] = {**weights, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)}
    for i, (field, tensors) in enumerate(cases.items()):
        with pytest.raises(AdapterError) as refused:
            import_lora(_edited(rich, tmp_path / str(i), weights=tensors), pair[0], tmp_path / "a.safetensors")
        assert refused.value.field == field, refused.value


def test_pickled_weights_only_are_refused(pair: tuple[Path, Path], rich: Path, tmp_path: Path) -> None:
    folder = _edited(rich, tmp_path)
    (folder / WEIGHTS).rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.safetensors") as refused:
        import_lora(folder, pair[0], tmp_path / "a.safetensors")
    assert refused.value.field == WEIGHTS


def _crafted_lora(data: bytes, role: str, value: torch.Tensor | None) -> bytes:
    tensors = st_load(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    key = f"model.layers.0.self_attn.q_proj.weight:{role}"
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    return seal(manifest, tensors)


@pytest.mark.parametrize(
    ("role", "value", "words"),
    [
        ("u", torch.full((64, 4), float("nan")), "non-finite"),
        ("v", torch.zeros(63, 4), "shape"),
        ("s", torch.zeros(5), "shape"),
        ("s", None, "missing"),
        ("u", torch.zeros(64, 4, dtype=torch.int32), "expected torch.float32"),
        ("s", torch.full((4,), 1e30), "beyond the servable"),
    ],
)
def test_crafted_lora_modules_are_refused_by_verify(
    pair: tuple[Path, Path], rich: Path, tmp_path: Path, role: str, value: torch.Tensor | None, words: str
) -> None:
    data = import_lora(rich, pair[0], tmp_path / "a.safetensors").out_path.read_bytes()
    with pytest.raises(InvalidArtifactError, match="q_proj") as refused:
        verify_artifact(_crafted_lora(data, role, value), pair[0])
    assert words in str(refused.value)


def test_ratio_compresses_the_adapters_delta(pair: tuple[Path, Path], rich: Path, tmp_path: Path) -> None:
    exact = import_lora(rich, pair[0], tmp_path / "exact.safetensors")
    small = import_lora(rich, pair[0], tmp_path / "small.safetensors", ratio=8.0, method="lowrank")
    art = verify_artifact(small.out_path, pair[0])
    assert art.method == "lora" and art.manifest["params"]["compressed_with"] == "lowrank"
    assert {m.layout for m in small.modules} <= {"svd", "dense"}
    errors = {m.name: m.rel_error for m in small.modules}
    assert 0 < errors["model.layers.0.self_attn.q_proj.weight"] < 1e-2  # rank 4 fits CR 8's 4 vectors: fp16 only
    assert errors["lm_head.weight"] > 0.1  # a whole random delta does not
    assert small.artifact_bytes < exact.artifact_bytes
    with pytest.raises(AdapterError) as refused:
        import_lora(rich, pair[0], tmp_path / "x.safetensors", ratio=8.0, method="dare")
    assert refused.value.field == "method"


def test_cli_imports_and_inspect_shows_rank_and_bytes(
    pair: tuple[Path, Path], rich: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.safetensors"
    assert main(["import-lora", str(rich), "--base", str(pair[0]), "--out", str(out)]) == 0
    assert "rank 2-6" in capsys.readouterr().out
    assert main(["inspect", str(out), "--base", str(pair[0])]) == 0
    shown = capsys.readouterr().out
    assert "method     lora" in shown and "rank       2-6" in shown and f"({out.stat().st_size} bytes" in shown
    dora = _edited(rich, tmp_path, config={"use_dora": True})
    assert main(["import-lora", str(dora), "--base", str(pair[0]), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "use_dora" in capsys.readouterr().err
