"""PEFT LoRA adapters made in the test with the real `peft` library, and peft's own merged model."""

from __future__ import annotations

from pathlib import Path

import torch

RICH = {
    "r": 4,
    "lora_alpha": 8,
    "use_rslora": True,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
    "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6},
    "alpha_pattern": {"o_proj": 3, "up_proj": 5.5},
    "modules_to_save": ["lm_head"],
}
"""Several targets (embedding LoRA too), rank_pattern, alpha_pattern, rslora, modules_to_save."""


def base_model(base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def write_adapter(base: Path, out: Path, seed: int, scale: float = 0.05, **config: object) -> Path:
    """A LoRA adapter of `base` saved by peft at `out`: every factor (and every saved whole module)
    set non-trivially from `seed`, so each adapted module's delta is nonzero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base_model(base), LoraConfig(init_lora_weights=False, **config))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale * 4)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    """peft's own reference: the adapter loaded on the base and merged (`merge_and_unload()`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(base), adapter).merge_and_unload().eval()
