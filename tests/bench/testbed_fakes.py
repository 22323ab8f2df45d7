"""Fine-tunes made in the testbed's tests: low-rank perturbations of a tiny base (no training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.testbed.finetune import REPORT


def low_rank_finetune(base: Path, dest: Path, seed: int = 3) -> Path:
    """A copy of `base` with a rank-2 delta on every 2-D weight, a small one on 1-D weights, and a
    training report like the real fine-tunes carry."""
    shutil.copytree(base, dest)
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, w in tensors.items():
        if w.ndim == 2:
            delta = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
        else:
            delta = torch.randn(w.shape, generator=gen)
        tensors[name] = w + 0.02 * delta
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / REPORT).write_text(json.dumps({"fake": True, "seed": seed}))
    return dest
