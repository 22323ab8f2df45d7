"""Fine-tunes made in the test: perturbed copies of a tiny base, single-file or sharded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def perturb(base: Path, dest: Path, seed: int = 1, rank: int = 4, noise: float = 0.1) -> Path:
    """Copy `base` to `dest` with a low-rank + noise delta on every 2-D tensor and a small dense
    delta on 1-D ones: the shape of a real fine-tune's delta at tiny scale."""
    shutil.copytree(base, dest)
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, w in tensors.items():
        if w.ndim == 2:
            low = torch.randn(w.shape[0], rank, generator=gen) @ torch.randn(rank, w.shape[1], generator=gen)
            tensors[name] = w + 0.01 * low / rank**0.5 + 0.01 * noise * torch.randn(w.shape, generator=gen)
        else:
            tensors[name] = w + 0.01 * torch.randn(w.shape, generator=gen)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def shard(folder: Path, dest: Path) -> Path:
    """A copy of `folder` with its weights split into two safetensors shards plus an index."""
    shutil.copytree(folder, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    (dest / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(dest / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest
