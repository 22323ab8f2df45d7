"""What an artifact costs and how well it keeps the delta: both ratios, its ideal size, what a
stored bitmask would have cost instead of regenerated masks, and per-module quality."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from compressor.artifact import Artifact, load_artifact
from compressor.codec import ModuleCode, json_float, json_int
from compressor.masks import bitmask_bytes

KEY_BYTES = 8


@dataclass(frozen=True)
class ArtifactSummary:
    """What `deltaserve inspect` shows of an artifact: sizes, ratios, method and per-module figures."""

    path: str
    sha256: str
    file_bytes: int
    method: str
    params: dict[str, object]
    linear_cr: float
    """The paper's CR over the linear layers: dense entries / kept values."""
    linear_bytes_ratio: float
    """Dense 16-bit bytes of the linear layers / their ideal stored bytes."""
    whole_ratio: float
    """Bytes of the dense 16-bit delta / bytes of the artifact file."""
    dense_delta_bytes: int
    ideal_bytes: int
    """Kept values x bits / 8 + singular values + per-module metadata (drop counts, keys, group params)."""
    bitmask_bytes: int
    """What stored bitmasks of the sparse factors would add (regenerated masks cost 0)."""
    quality: dict[str, dict[str, object]]

    @property
    def over_ideal(self) -> float:
        return self.file_bytes / self.ideal_bytes if self.ideal_bytes else float("inf")


def ideal_bytes(code: ModuleCode) -> int:
    """The information the module must carry, counted from its values, not from how they are stored."""
    t = code.tensors
    if code.layout == "dense":
        return t["delta"].numel() * t["delta"].element_size()
    if code.layout == "sparse":
        return code.kept * t["d"].element_size() + KEY_BYTES
    if code.layout == "qsparse":
        return code_bits(code) // 8 + t["groups"].numel() * 2 + KEY_BYTES
    if code.layout == "full":
        return code.kept * t["d"].element_size()
    if code.layout == "lora":
        return sum(x.numel() * x.element_size() for x in t.values())
    drops = 2 * code.rank * (2 if max(code.shape) < 2**16 else 4)
    values = code.kept * t["u"].element_size() if code.layout == "svd" else code_bits(code) // 8
    groups = t["groups"].numel() * t["groups"].element_size() if "groups" in t else 0
    return values + 4 * code.rank + drops + 2 * KEY_BYTES + groups


def code_bits(code: ModuleCode) -> int:
    """Bits of the quantised codes of a "qsvd" module (exactly the packed payload's useful bits)."""
    return code.meta_int("code_bits")


def mask_bytes(code: ModuleCode) -> int:
    """Bytes a stored bitmask of the code's kept positions would take (the seed makes them cost nothing)."""
    if code.layout in ("svd", "qsvd"):
        return bitmask_bytes(code.shape[0], code.rank) + bitmask_bytes(code.shape[1], code.rank)
    if code.layout in ("sparse", "qsparse"):
        return bitmask_bytes(code.shape[0], code.shape[1])
    return 0


def summarize(source: Path | str | bytes, artifact: Artifact | None = None) -> ArtifactSummary:
    """The summary of an artifact (a path or its bytes; `artifact` when it is already loaded)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    art = artifact or load_artifact(data)
    codes = [m.code for m in art.modules()]
    manifest = art.manifest
    dense = json_int(manifest["dense_delta_bytes"], "dense_delta_bytes")
    return ArtifactSummary(
        path="<bytes>" if isinstance(source, bytes) else str(source),
        sha256=hashlib.sha256(data).hexdigest(),
        file_bytes=len(data),
        method=art.method,
        params=_object(manifest.get("params", {}), "params"),
        linear_cr=json_float(manifest["linear_cr"], "linear_cr"),
        linear_bytes_ratio=json_float(manifest["linear_bytes_ratio"], "linear_bytes_ratio"),
        whole_ratio=dense / len(data),
        dense_delta_bytes=dense,
        ideal_bytes=sum(ideal_bytes(c) for c in codes),
        bitmask_bytes=sum(mask_bytes(c) for c in codes),
        quality=_quality(manifest.get("quality", {})),
    )


def _object(value: object, what: str) -> dict[str, object]:
    """A JSON object of the manifest (load_artifact checked it is one), copied."""
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be an object, not {value!r:.40}")
    return dict(value)


def _quality(value: object) -> dict[str, dict[str, object]]:
    """The manifest's per-module quality: {module: {group, rank, kept, rel_error}}."""
    return {name: _object(entry, f"quality of {name}") for name, entry in _object(value, "quality").items()}
