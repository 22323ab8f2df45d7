"""Rotary position embeddings: inverse frequencies from the model's config, cos/sin per row position.

Scaled variants (linear, llama3, yarn, ...) reuse transformers' initialisers so our frequencies are
bit-identical to the reference implementation; `default` is the plain formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.config import ModelConfig


@dataclass(frozen=True)
class Rope:
    """The model's rotary frequencies and their attention scaling."""

    inv_freq: torch.Tensor  # [head_dim // 2] float32
    attention_scaling: float

    @classmethod
    def from_config(cls, config: ModelConfig, folder: Path | None, device: torch.device) -> Rope:
        """The model's RoPE; a scaled rope type needs the folder to read transformers' config."""
        if config.rope_scaling.rope_type == "default":
            steps = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
            return cls((1.0 / (config.rope_theta**steps)).to(device), 1.0)
        if folder is None:
            raise ValueError(f"rope type {config.rope_scaling.rope_type!r} needs the model folder")
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_config = AutoConfig.from_pretrained(folder)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[config.rope_scaling.rope_type](hf_config, device)
        return cls(inv_freq.to(device=device, dtype=torch.float32), float(scaling))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, head_dim] for positions: [T] int64, in the activation dtype."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] rotated by cos/sin: [T, head_dim] (the half-split layout of HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
