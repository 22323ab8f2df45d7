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
    """One tensor of a checkpoint, read from its safetensors header: name, shape, dtype and file."""

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
                tensor: torch.Tensor = fh.get_tensor(name)  # safetensors' stubs type it Any
                return tensor
        except (SafetensorError, OSError) as exc:
            raise IncompatibleCheckpointError(f"{info.file.name}: cannot read {name}: {exc}") from None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in memory (for small models, tests and `reconstruct`)."""
        return dict(self.tensors())


def _read_config(folder: Path) -> dict[str, object]:
    config = _read_json(_confined(folder, "config.json", "config.json"))
    if not isinstance(config, dict):
        raise IncompatibleCheckpointError(f"config.json is not a JSON object (it is {_kind(config)})")
    return config


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise IncompatibleCheckpointError(f"{path.name}: not valid JSON ({type(exc).__name__}: {exc})") from None


def _kind(value: object) -> str:
    """A JSON value's type in JSON's words, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: the index's shards (each confined to the folder), else the single file."""
    if _present(folder / INDEX_FILE):
        index = _read_json(_confined(folder, INDEX_FILE, INDEX_FILE))
        return [_confined(folder, name, f"{INDEX_FILE}: shard {name!r}") for name in _shard_names(index)]
    if _present(folder / SINGLE_FILE):
        return [_confined(folder, SINGLE_FILE, SINGLE_FILE)]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".gguf"})
    hint = f" (found {', '.join(found)}; convert to safetensors first)" if found else ""
    raise IncompatibleCheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _shard_names(index: object) -> list[str]:
    """The distinct shard file names of a parsed index; each must be a plain file name."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = f"a weight_map that is {_kind(weight_map)}" if isinstance(index, dict) else _kind(index)
        raise IncompatibleCheckpointError(
            f"{INDEX_FILE}: not a safetensors index (expected an object with a "
            f"non-empty weight_map object; found {found})"
        )
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not _plain_name(name):
            raise IncompatibleCheckpointError(
                f"{INDEX_FILE}: weight_map entry {tensor!r:.80} names {name!r:.200}; a shard must be a plain "
                f"*.safetensors file name of the checkpoint's own folder"
            )
    return sorted(set(weight_map.values()))


def _plain_name(name: str) -> bool:
    """A file name with no folder part: no '/', '\\', '..', drive or leading dot; ends in .safetensors."""
    return (
        name.endswith(".safetensors")
        and not name.startswith(".")
        and ".." not in name
        and not any(c in name for c in "/\\:\0")
    )


def _present(path: Path) -> bool:
    """The entry exists in its folder (a link counts, wherever it points)."""
    return path.is_symlink() or path.exists()


def _confined(folder: Path, name: str, where: str) -> Path:
    """folder / name when it is a regular file of the folder itself (a link must stay inside the folder);
    `where` names the entry in the error. Links are judged before existence, so nothing is told about
    paths outside the folder."""
    path = folder / name
    if path.is_symlink() and path.resolve().parent != folder.resolve():
        raise IncompatibleCheckpointError(f"{where} is a symbolic link out of the checkpoint's folder")
    if not path.is_file():
        raise IncompatibleCheckpointError(
            f"{where} is not among the checkpoint's files"
            + (" (expected an HF-layout model folder)" if name == "config.json" else "")
        )
    return path


def _scan(folder: Path) -> Iterator[TensorInfo]:
    seen: dict[str, str] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                    if name in seen:
                        raise IncompatibleCheckpointError(f"tensor {name} is in both {seen[name]} and {file.name}")
                    seen[name] = file.name
                    sl = fh.get_slice(name)
                    yield TensorInfo(name, tuple(sl.get_shape()), str(sl.get_dtype()), file)
        except (SafetensorError, OSError) as exc:
            raise IncompatibleCheckpointError(f"{file.name}: not a readable safetensors file ({exc})") from None


def check_compatible(base_dir: Path | str, finetuned_dir: Path | str) -> None:
    """Raise IncompatibleCheckpointError unless the fine-tune has the base's architecture, tensors,
    shapes and dtypes; returns None when the pair can be compressed."""
    base, tuned = _open(base_dir, "the base"), _open(finetuned_dir, "the fine-tune")
    for key in ARCH_KEYS:
        if base.config.get(key) != tuned.config.get(key):
            raise IncompatibleCheckpointError(
                f"other architecture: {key} is {tuned.config.get(key)!r} in the fine-tune, "
                f"{base.config.get(key)!r} in the base"
            )
    _check_same_tensors(base, tuned)


def _open(folder: Path | str, role: str) -> Checkpoint:
    try:
        return Checkpoint(folder)
    except IncompatibleCheckpointError as exc:
        raise IncompatibleCheckpointError(f"{role}: {exc}") from None


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
