"""The artifact file: one safetensors file whose header metadata carries the JSON manifest.

Layout: tensors named "<tensor name>:<role>" (roles in codec.py); metadata key "deltaserve" holds
the manifest JSON and "deltaserve.checksum" the sha256 of the manifest text followed by every
tensor's name, dtype, shape and bytes in name order. No pickle anywhere: safetensors + JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compressor.codec import ModuleCode, decode_dense, decode_factors
from compressor.errors import (
    ArtifactError,
    CorruptArtifactError,
    InvalidArtifactError,
    UnsupportedVersionError,
    WrongBaseError,
)
from compressor.validate import check_code, check_decoded, check_dense, check_manifest_fields, module_entry

FORMAT = "deltaserve-artifact"
VERSION = 1
MANIFEST_KEY = "deltaserve"
CHECKSUM_KEY = "deltaserve.checksum"
MAX_HEADER = 64 << 20


def artifact_bytes(manifest: dict[str, object], codes: list[ModuleCode]) -> bytes:
    """Serialise the manifest (with per-module layouts) and every module's tensors."""
    tensors = {f"{c.name}:{role}": t.contiguous() for c in codes for role, t in c.tensors.items()}
    modules = {c.name: {"shape": list(c.shape), "layout": c.layout, **c.meta} for c in codes}
    text = json.dumps({**manifest, "format": FORMAT, "version": VERSION, "modules": modules}, sort_keys=True)
    metadata = {MANIFEST_KEY: text, CHECKSUM_KEY: _checksum(text, tensors)}
    return st_save(tensors, metadata=metadata)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _checksum(text: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"\n{name}|{t.dtype}|{list(t.shape)}\n".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModuleDelta:
    """One tensor's delta in an artifact; reconstructs on demand."""

    code: ModuleCode

    @property
    def name(self) -> str:
        return self.code.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.code.shape

    @property
    def kind(self) -> str:
        """ "factors" (2-D: hand u, s, v to the kernels) or "dense" (1-D: add as is)."""
        return "dense" if self.code.layout == "dense" else "factors"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u [out, K], s [K], v [in, K]) float32 CPU, delta = u @ diag(s) @ v.T; K may be 0.
        Checked: finite, every delta entry within validate.MAX_DELTA (else InvalidArtifactError)."""
        u, s, v = decode_factors(self.code)
        check_decoded(self.name, u, s, v, self.code.layout)
        return u, s, v

    def dense(self) -> torch.Tensor:
        """The full reconstructed delta, float32, the base tensor's shape; checked like factors()."""
        delta = decode_dense(self.code)
        check_dense(self.name, delta)
        return delta


class Artifact:
    """A loaded, validated artifact: its manifest and one ModuleDelta per base tensor."""

    def __init__(self, manifest: dict[str, object], codes: dict[str, ModuleCode]) -> None:
        self.manifest = manifest
        self._codes = codes

    @property
    def method(self) -> str:
        return str(self.manifest["method"])

    @property
    def names(self) -> list[str]:
        return list(self._codes)

    def module(self, name: str) -> ModuleDelta:
        return ModuleDelta(self._codes[name])

    def modules(self) -> Iterator[ModuleDelta]:
        for name in self._codes:
            yield ModuleDelta(self._codes[name])

    def merged_state_dict(self, base_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """W_base + reconstructed delta for every tensor (summed in float32, cast to the base dtype)."""
        merged = {}
        for name, weight in base_state_dict.items():
            merged[name] = (
                (weight.to(torch.float32) + self.module(name).dense()).to(weight.dtype)
                if name in self._codes
                else weight
            )
        return merged


def load_artifact(source: Path | str | bytes, base_dir: Path | str | None = None) -> Artifact:
    """Parse and validate an artifact: format, version, checksum, the manifest's fields, every module's
    stored tensors (validate.check_code); with base_dir, fingerprint and shapes. Decoding is lazy and
    checked per module (ModuleDelta); `verify_artifact` decodes them all."""
    data = source if isinstance(source, bytes) else _read(Path(source))
    metadata = _header_metadata(data)
    manifest = _manifest(metadata)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise CorruptArtifactError(f"artifact tensors unreadable: {exc}") from None
    if _checksum(metadata[MANIFEST_KEY], tensors) != metadata.get(CHECKSUM_KEY):
        raise CorruptArtifactError("artifact checksum mismatch: the file is damaged or was edited")
    codes = _codes(manifest, tensors)
    if base_dir is not None:
        check_base(manifest, codes, Path(base_dir))  # first: the base bounds every shape checked below
    for code in codes.values():
        check_code(code)
    return Artifact(manifest, codes)


def verify_artifact(source: Path | str | bytes, base_dir: Path | str) -> Artifact:
    """load_artifact against the base, then decode every module in full: the check an artifact passes
    before it is published. Raises an ArtifactError (InvalidArtifactError naming the module) on failure."""
    artifact = load_artifact(source, base_dir)
    for module in artifact.modules():
        try:
            module.dense() if module.kind == "dense" else module.factors()
        except ArtifactError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise InvalidArtifactError(f"{module.name}: cannot be decoded ({type(exc).__name__}: {exc})") from None
    return artifact


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CorruptArtifactError(f"{path}: cannot read artifact ({exc})") from None


def _header_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__, after checking the header fits in the data."""
    if len(data) < 8:
        raise CorruptArtifactError(f"artifact truncated: {len(data)} bytes")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER or 8 + size > len(data):
        raise CorruptArtifactError("artifact truncated or not safetensors: header runs past the end")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptArtifactError(f"artifact header is not JSON: {type(exc).__name__}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or MANIFEST_KEY not in metadata:
        raise CorruptArtifactError("not a deltaserve artifact: no manifest in the safetensors metadata")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CorruptArtifactError(f"safetensors metadata value {key!r:.60} is not a string")
    return metadata


def _manifest(metadata: dict[str, str]) -> dict[str, object]:
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CorruptArtifactError(f"artifact manifest is not JSON: {type(exc).__name__}") from None
    if not isinstance(manifest, dict):
        raise CorruptArtifactError(f"artifact manifest is not a JSON object (it is {type(manifest).__name__})")
    if manifest.get("format") != FORMAT:
        raise CorruptArtifactError(f"not a deltaserve artifact (format {manifest.get('format')!r:.60})")
    if manifest.get("version") != VERSION:
        raise UnsupportedVersionError(
            f"artifact format version {manifest.get('version')!r:.20} is not supported (this code reads {VERSION})"
        )
    check_manifest_fields(manifest)
    return manifest


def _codes(manifest: dict[str, object], tensors: dict[str, torch.Tensor]) -> dict[str, ModuleCode]:
    """One ModuleCode per manifest module entry (checked: validate.module_entry); a tensor of no module
    is an error."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, role = key.rpartition(":")
        grouped.setdefault(name, {})[role] = tensor
    modules = manifest["modules"]
    assert isinstance(modules, dict), "check_manifest_fields lets only an object through"
    stray = sorted(set(grouped) - set(modules))
    if stray:
        raise InvalidArtifactError(f"tensor(s) of no module in the manifest: {', '.join(stray)[:200]}")
    codes = {}
    for name, entry in modules.items():
        shape, layout, meta = module_entry(name, entry)
        codes[name] = ModuleCode(name, shape, layout, grouped.get(name, {}), meta)
    return codes


def check_base(manifest: dict[str, object], codes: dict[str, ModuleCode], base_dir: Path) -> None:
    """Raise WrongBaseError unless base_dir is the base the artifact was made against."""
    from compressor.checkpoint import Checkpoint, base_fingerprint

    if manifest.get("base_fingerprint") != base_fingerprint(base_dir):
        raise WrongBaseError("artifact was made against another base (its base fingerprint differs from this base's)")
    infos = Checkpoint(base_dir).infos
    for name, code in codes.items():
        if name not in infos or tuple(infos[name].shape) != tuple(code.shape):
            found = infos[name].shape if name in infos else "absent"
            raise WrongBaseError(f"artifact tensor {name} {code.shape} does not fit the base ({found})")
