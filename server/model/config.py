"""Read an HF-layout base model folder's config.json into a frozen, validated ModelConfig.

Accepts the Llama family: Llama 2/3, SmolLM2, Mistral (model_type llama / mistral) and Qwen2
(qkv bias). Anything else is refused with a clear error rather than served wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The folder holds a model deltaserve cannot serve (architecture, missing field, bad value)."""


@dataclass(frozen=True)
class RopeScaling:
    """The base's RoPE scaling (config.json's rope_parameters or rope_scaling); `extra` holds the rest."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    """What deltaserve reads of a base's config.json, validated (see from_dict)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    layer_windows: tuple[int | None, ...] = ()
    """Per decoder layer: the sliding attention window (a query sees the keys at most window - 1
    positions back), or None for full attention. Empty means full attention everywhere."""

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer`, or None for full attention."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def q_size(self) -> int:
        """Width of the query projection: heads * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projections: kv heads * head_dim."""
        return self.num_key_value_heads * self.head_dim

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each linear weight of one decoder layer, by HF module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_size, h),
            "self_attn.k_proj": (self.kv_size, h),
            "self_attn.v_proj": (self.kv_size, h),
            "self_attn.o_proj": (h, self.q_size),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    @classmethod
    def from_dir(cls, folder: Path | str) -> ModelConfig:
        """The config.json of an HF-layout folder; UnsupportedModelError when missing or not JSON."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{folder}: no config.json (expected an HF-layout model folder)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UnsupportedModelError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """A parsed config.json, checked; UnsupportedModelError (naming `source`) for what cannot be served."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"deltaserve serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in need if not isinstance(raw.get(k), int) or raw[k] <= 0]
        if missing:
            raise UnsupportedModelError(f"{source}: missing or invalid {', '.join(missing)}")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UnsupportedModelError(f"{source}: {heads} attention heads not divisible by {kv_heads} KV heads")
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_params(raw).get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            layer_windows=_layer_windows(raw, model_type, source),
        )


def _layer_windows(raw: dict[str, Any], model_type: str, source: str) -> tuple[int | None, ...]:
    """Sliding windows as transformers applies them: Mistral on every layer (4096 when the key is
    absent, none when null); Qwen2 only with use_sliding_window, on layers from max_window_layers
    on; an explicit `layer_types` list wins."""
    layers = int(raw["num_hidden_layers"])
    if model_type == "mistral" or (model_type == "qwen2" and raw.get("use_sliding_window")):
        window = raw.get("sliding_window", 4096)
    else:
        return ()
    if window is None:
        return ()
    if not isinstance(window, int) or window <= 0:
        raise UnsupportedModelError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if model_type == "qwen2":
        first = raw.get("max_window_layers", 28)
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters`; older configs write `rope_scaling` (or nothing)."""
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling:
    params = dict(_rope_params(raw))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"{source}: rope type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    params.pop("rope_theta", None)
    return RopeScaling(
        rope_type=rope_type,
        factor=float(params.pop("factor", 1.0)),
        low_freq_factor=float(params.pop("low_freq_factor", 1.0)),
        high_freq_factor=float(params.pop("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.pop("original_max_position_embeddings", None),
        extra=params,
    )
