"""Base models: the tiny random Llama (deterministic, loadable, UTF-8 safe) and the shipped SmolLM2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from server.model.config import ModelConfig
from server.model.provision import MANIFEST, ProvisionError, resolve_base_model, verify_folder
from server.model.synthetic import write_tiny


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_tiny(tmp_path / "a", seed=7)
    b = write_tiny(tmp_path / "b", seed=7)
    c = write_tiny(tmp_path / "c", seed=8)
    assert _file_bytes(a) == _file_bytes(b)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_loads_in_transformers_and_matches_its_config(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    config = ModelConfig.from_dir(tiny_model)
    logits = model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, config.vocab_size)
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert torch.isfinite(logits).all()


def _random_text(rng: random.Random) -> str:
    pools = ["abc xyz", "0123456789 +-=", "éàüßø", "日本語中文", "🎉🚀👩‍💻", "\n\t  ", '{"k": [1]}']
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 60)))


def test_tiny_tokenizer_round_trips_arbitrary_utf8(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_chat_template_renders_chatml(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tampered_folder_fails_verification(tmp_path: Path) -> None:
    folder = write_tiny(tmp_path / "t", seed=0)
    assert verify_folder(folder)
    with (folder / "config.json").open("a") as fh:
        fh.write(" ")
    assert not verify_folder(folder)


def test_unknown_base_model_name_says_how_to_provision(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="deltaserve models pull"):
        resolve_base_model("nope", tmp_path)


@pytest.mark.slow
def test_smollm2_greedy_says_paris(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert verify_folder(smollm2_dir) and (smollm2_dir / MANIFEST).is_file()
    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    continuation = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert continuation.strip().startswith("Paris")
    assert "chat_template" in json.loads((smollm2_dir / "tokenizer_config.json").read_text())


def test_smollm2_config_reads_as_tied_gqa_llama(smollm2_dir: Path) -> None:
    config = ModelConfig.from_dir(smollm2_dir)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
