"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a flat batch of rows.

Weights stay in one dict under their HF state-dict names, which are also the names task deltas use,
so the delta of any tensor is found by the name the forward already holds. Every linear computes the
base product once for all rows, then `kernels.add_delta` adds each task's delta to its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

import kernels
from server.model.attention import AttentionMeta, LayerCache, paged_attention
from server.model.config import ModelConfig
from server.model.deltas import StepDeltas
from server.model.rope import Rope, apply_rope

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class ForwardBatch:
    """One step's rows: their tokens, positions, which rows need logits, and the attention layout."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    logit_rows: torch.Tensor  # [R] int64 rows whose next-token logits are wanted; R may be 0
    attention: AttentionMeta

    @classmethod
    def of(
        cls, ids: list[int], positions: list[int], logit_rows: list[int], attention: AttentionMeta, device: torch.device
    ) -> ForwardBatch:
        """The batch from host lists, every index tensor int64 by construction (an empty list too: a step
        that holds only a prompt's non-final chunk has no logit rows)."""

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(index(ids), index(positions), index(logit_rows), attention)


def load_state_dict(folder: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's *.safetensors files, on `device` in `dtype`."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                weights[name] = fh.get_tensor(name).to(device=device, dtype=dtype)
    return weights


class LlamaModel:
    """The decoder's weights (HF names), config and RoPE; `forward` runs one step's rows."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], rope: Rope) -> None:
        self.config = config
        self.weights = weights
        self.rope = rope
        self.lm_head_name = EMBED if config.tie_word_embeddings or LM_HEAD not in weights else LM_HEAD
        embed = weights[EMBED]
        self.device, self.dtype = embed.device, embed.dtype

    @classmethod
    def from_dir(
        cls, folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> LlamaModel:
        """The model of an HF folder (config.json, *.safetensors) on `device` in `dtype`."""
        config = ModelConfig.from_dir(folder)
        device = torch.device(device)
        return cls(config, load_state_dict(Path(folder), device, dtype), Rope.from_config(config, Path(folder), device))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: list[LayerCache], deltas: StepDeltas | None = None) -> torch.Tensor:
        """Run every row through the decoder, writing K/V to `kv`; returns logits: [R, vocab] float32."""
        x = self._embed(batch.input_ids, deltas)
        cos, sin = self.rope.cos_sin(batch.positions, self.dtype)
        for layer in range(self.config.num_hidden_layers):
            x = self._layer(layer, x, cos, sin, kv[layer], batch.attention, deltas)
        if batch.logit_rows.numel() == 0:
            return x.new_empty((0, self.weights[self.lm_head_name].shape[0]), dtype=torch.float32)
        last = x[batch.logit_rows]
        last = self._norm("model.norm.weight", last, deltas, logits=True)
        return self._lm_head(last, deltas).float()

    def _embed(self, ids: torch.Tensor, deltas: StepDeltas | None) -> torch.Tensor:
        """ids: [T] int64 -> [T, hidden]: the base embedding plus each row's task delta."""
        x = F.embedding(ids, self.weights[EMBED])
        factors = deltas.factors(EMBED) if deltas is not None else None
        if deltas is None or factors is None:
            return x
        return x + kernels.embedding_delta(ids, deltas.plan, factors).to(x.dtype)

    def _lm_head(self, x: torch.Tensor, deltas: StepDeltas | None) -> torch.Tensor:
        """x: [R, hidden] of the logit rows -> [R, vocab]: the base head plus each row's task delta."""
        logits = F.linear(x, self.weights[self.lm_head_name])
        factors = deltas.factors(self.lm_head_name) if deltas is not None else None
        if deltas is not None and factors is not None:
            kernels.add_delta(logits, x, deltas.logits_plan, factors)
        return logits

    def _layer(
        self,
        i: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
        meta: AttentionMeta,
        deltas: StepDeltas | None,
    ) -> torch.Tensor:
        """x: [T, hidden] through one decoder layer."""
        p = f"model.layers.{i}."
        h = self._norm(p + "input_layernorm.weight", x, deltas)
        x = x + self._attention(p + "self_attn.", h, cos, sin, cache, meta, deltas, self.config.window(i))
        h = self._norm(p + "post_attention_layernorm.weight", x, deltas)
        gate = self._linear(p + "mlp.gate_proj", h, deltas)
        up = self._linear(p + "mlp.up_proj", h, deltas)
        return x + self._linear(p + "mlp.down_proj", F.silu(gate) * up, deltas)

    def _attention(
        self,
        p: str,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
        meta: AttentionMeta,
        deltas: StepDeltas | None,
        window: int | None = None,
    ) -> torch.Tensor:
        c, rows = self.config, h.shape[0]
        q = self._linear(p + "q_proj", h, deltas).view(rows, c.num_attention_heads, c.head_dim)
        k = self._linear(p + "k_proj", h, deltas).view(rows, c.num_key_value_heads, c.head_dim)
        v = self._linear(p + "v_proj", h, deltas).view(rows, c.num_key_value_heads, c.head_dim)
        out = paged_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache, meta, window)
        return self._linear(p + "o_proj", out.reshape(rows, c.q_size), deltas)

    def _linear(self, module: str, x: torch.Tensor, deltas: StepDeltas | None) -> torch.Tensor:
        """x: [T, in] -> [T, out]: the base product for all rows, plus each row's task delta."""
        bias = self.weights.get(module + ".bias")
        y = F.linear(x, self.weights[module + ".weight"], bias)
        if deltas is None:
            return y
        factors = deltas.factors(module + ".weight")
        if factors is not None:
            kernels.add_delta(y, x, deltas.plan, factors)
        bias_delta = deltas.dense_rows(module + ".bias") if bias is not None else None
        return y if bias_delta is None else y + bias_delta

    def _norm(self, name: str, x: torch.Tensor, deltas: StepDeltas | None, logits: bool = False) -> torch.Tensor:
        """RMSNorm in float32 (as HF does); the weight is the base's plus each row's delta, if any."""
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        weight = self.weights[name]
        row_delta = deltas.dense_rows(name, logits) if deltas else None
        if row_delta is not None:
            weight = weight + row_delta
        return weight * xf.to(dtype)
