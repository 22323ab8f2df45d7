"""The config reader accepts the Llama family and refuses anything else with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.model.config import ModelConfig, UnsupportedModelError

LLAMA = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}


def test_llama3_rope_scaling_is_read() -> None:
    raw = LLAMA | {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 500000.0
    assert (config.rope_scaling.rope_type, config.rope_scaling.factor) == ("llama3", 8.0)
    assert config.rope_scaling.original_max_position_embeddings == 8192


def test_qwen2_has_qkv_bias_by_default_and_mistral_is_accepted() -> None:
    assert ModelConfig.from_dict(LLAMA | {"model_type": "qwen2"}).attention_bias
    assert not ModelConfig.from_dict(LLAMA | {"model_type": "mistral"}).attention_bias


def test_sliding_windows_follow_transformers() -> None:
    assert ModelConfig.from_dict(LLAMA).layer_windows == ()
    assert ModelConfig.from_dict(LLAMA | {"model_type": "mistral"}).layer_windows == (4096, 4096)  # HF default
    assert ModelConfig.from_dict(LLAMA | {"model_type": "mistral", "sliding_window": None}).layer_windows == ()
    assert ModelConfig.from_dict(LLAMA | {"model_type": "mistral", "sliding_window": 7}).window(1) == 7
    qwen = LLAMA | {"model_type": "qwen2", "sliding_window": 5, "max_window_layers": 1}
    assert ModelConfig.from_dict(qwen).layer_windows == ()  # use_sliding_window is off by default
    assert ModelConfig.from_dict(qwen | {"use_sliding_window": True}).layer_windows == (None, 5)
    typed = qwen | {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]}
    assert ModelConfig.from_dict(typed).layer_windows == (5, None)
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        ModelConfig.from_dict(LLAMA | {"model_type": "mistral", "sliding_window": 0})


def test_gqa_shapes_of_linear_weights() -> None:
    shapes = ModelConfig.from_dict(LLAMA).linear_shapes
    assert shapes["self_attn.k_proj"] == (16, 64) and shapes["self_attn.o_proj"] == (64, 64)
    assert shapes["mlp.down_proj"] == (64, 96)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**LLAMA, "model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({**LLAMA, "num_key_value_heads": 3}, "not divisible"),
        ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size"),
        ({**LLAMA, "rope_scaling": {"type": "longrope"}}, "rope type 'longrope'"),
    ],
)
def test_unsupported_configs_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_dict(raw)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
