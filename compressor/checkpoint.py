"""Read HF-layout checkpoints tensor by tensor: single or sharded safetensors, memory-mapped.

A `Checkpoint` never loads a whole model: `tensor(name)` reads one tensor through `safe_open`, so
compressing a pair holds a few matrices at a time. `check_compatible` and `base_fingerprint` are
the two public checks built on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from compressor.errors import IncompatibleCheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ARCH_KEYS = ("model_type", "architectures", "tie_word_embeddings")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path


class Checkpoint:
    """The tensors of one HF model folder, read lazily."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.config = _read_config(self.folder)
        self.infos = {info.name: info for info in _scan(self.folder)}

    @property
    def names(self) -> list[str]:
        return sorted(self.infos)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (its own dtype), read from the memory-mapped file."""
        info = self.infos[name]
        try:
            with safe_open(str(info.file), framework="pt") as fh:
                return fh.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise IncompatibleCheckpointError(f"{info.file}: cannot read {name}: {exc}") from None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in memory (for small models, tests and `reconstruct`)."""
        return dict(self.tensors())


def _read_config(folder: Path) -> dict[str, object]:
    path = folder / "config.json"
    if not path.is_file():
        raise IncompatibleCheckpointError(f"{folder}: no config.json (expected an HF-layout model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleCheckpointError(f"{path}: not valid JSON ({exc})") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise IncompatibleCheckpointError(f"{index}: not a safetensors index ({exc})") from None
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".gguf"})
    hint = f" (found {', '.join(found)}; convert to safetensors first)" if found else ""
    raise IncompatibleCheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _scan(folder: Path) -> Iterator[TensorInfo]:
    for file in _weight_files(folder):
        if not file.is_file():
            raise IncompatibleCheckpointError(f"{file}: listed in the index but missing")
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    yield TensorInfo(name, tuple(sl.get_shape()), str(sl.get_dtype()), file)
        except (SafetensorError, OSError) as exc:
            raise IncompatibleCheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def check_compatible(base_dir: Path | str, finetuned_dir: Path | str) -> None:
    """Raise IncompatibleCheckpointError unless the fine-tune has the base's architecture, tensors,
    shapes and dtypes; returns None when the pair can be compressed."""
    base, tuned = Checkpoint(base_dir), Checkpoint(finetuned_dir)
    for key in ARCH_KEYS:
        if base.config.get(key) != tuned.config.get(key):
            raise IncompatibleCheckpointError(
                f"other architecture: {key} is {tuned.config.get(key)!r} in the fine-tune, "
                f"{base.config.get(key)!r} in the base"
            )
    _check_same_tensors(base, tuned)


def _check_same_tensors(base: Checkpoint, tuned: Checkpoint) -> None:
    missing = sorted(set(base.infos) - set(tuned.infos))
    extra = sorted(set(tuned.infos) - set(base.infos))
    if missing:
        raise IncompatibleCheckpointError(f"missing tensor(s) in the fine-tune: {', '.join(missing[:5])}")
    if extra:
        raise IncompatibleCheckpointError(f"extra tensor(s) in the fine-tune: {', '.join(extra[:5])}")
    for name, info in base.infos.items():
        other = tuned.infos[name]
        if other.shape != info.shape:
            raise IncompatibleCheckpointError(f"shape mismatch on {name}: {other.shape} vs base {info.shape}")
        if other.dtype != info.dtype:
            raise IncompatibleCheckpointError(f"dtype mismatch on {name}: {other.dtype} vs base {info.dtype}")


def base_fingerprint(base_dir: Path | str) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (cached per file state)."""
    folder = Path(base_dir).resolve()
    files = _weight_files(folder)
    state = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(folder, state)


@lru_cache(maxsize=16)
def _fingerprint(folder: Path, state: tuple[tuple[str, int, int], ...]) -> str:
    checkpoint = Checkpoint(folder)
    digest = hashlib.sha256()
    for name, tensor in checkpoint.tensors():
        info = checkpoint.infos[name]
        digest.update(f"{name}|{info.dtype}|{list(info.shape)}\n".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
