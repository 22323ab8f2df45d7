"""What an artifact must be before anything serves it: checks on its manifest, on every module's stored
tensors (roles, dtypes, sizes, drop counts, mask keys, finite values) and on what a module decodes to.

`load_artifact` runs the manifest and stored-tensor checks on every load (they cost a pass over the
stored bytes, not a decode); `ModuleDelta.factors()` / `dense()` check what they decode, so the engine
never unpacks an unchecked module; `verify_artifact` decodes every module, for publishing. A failure
raises InvalidArtifactError naming the module and what is wrong.
"""

from __future__ import annotations

import json
import math

import torch

from compressor.codec import VALUE_DTYPE, ModuleCode, column_bits
from compressor.errors import InvalidArtifactError
from compressor.masks import MASK_SCHEME
from compressor.quantize import n_groups

MAX_DELTA = 65504.0
"""The largest delta entry served (the largest float16): a larger one overflows 16-bit activations."""
MAX_BITS = 8
MAX_DIM = 2**31 - 1
"""The largest dimension of a module (drop counts are stored in at most 32 bits)."""
MAX_NAME = 512
DROPS = (torch.uint16, torch.int32)
FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""A LoRA module's factors: float32, or the adapter's own 16-bit dtype."""
_SVD = {"s": (torch.float32,), "u": (VALUE_DTYPE,), "v": (VALUE_DTYPE,), "u_drops": DROPS, "v_drops": DROPS}
ROLES: dict[str, dict[str, tuple[torch.dtype, ...]]] = {
    "svd": _SVD,
    "qsvd": {**_SVD, "u": (torch.uint8,), "v": (torch.uint8,), "groups": (torch.float16,)},
    "sparse": {"d": (VALUE_DTYPE,)},
    "qsparse": {"d": (torch.uint8,), "groups": (torch.float16,)},
    "full": {"d": (VALUE_DTYPE, torch.float32)},
    "dense": {"delta": (torch.float32,)},
    "lora": {"u": FACTOR_DTYPES, "s": (torch.float32,), "v": FACTOR_DTYPES},
}
"""Each layout's stored tensors and their allowed dtypes: exactly these, no more, no fewer."""


def check_manifest_fields(manifest: dict[str, object]) -> None:
    """The manifest fields the server reads: method, base fingerprint, ratio, params, quality, modules."""
    for key, kind in (("method", str), ("base_fingerprint", str), ("params", dict), ("modules", dict)):
        if not isinstance(manifest.get(key), kind):
            raise InvalidArtifactError(
                f"manifest field {key!r} must be {kind.__name__}, not {type(manifest.get(key)).__name__}"
            )
    ratio = manifest.get("ratio")
    if ratio is not None and not (type(ratio) is int or (type(ratio) is float and math.isfinite(ratio))):
        raise InvalidArtifactError(f"manifest field 'ratio' must be a finite number or null, not {ratio!r:.40}")
    if manifest.get("mask_scheme", MASK_SCHEME) != MASK_SCHEME:
        raise InvalidArtifactError(
            f"mask_scheme {manifest.get('mask_scheme')!r:.40} is not {MASK_SCHEME!r}: its masks would decode wrongly"
        )
    if not isinstance(manifest.get("quality", {}), dict):
        raise InvalidArtifactError("manifest field 'quality' must be an object")
    try:
        json.dumps(manifest.get("quality", {}), allow_nan=False)
    except ValueError:
        raise InvalidArtifactError("manifest field 'quality' holds a non-finite number") from None


def module_entry(name: str, entry: object) -> tuple[tuple[int, ...], str, dict[str, object]]:
    """(shape, layout, metadata) of one manifest module entry."""
    if len(name) > MAX_NAME:
        raise InvalidArtifactError(f"module name {name[:60]!r}... is longer than {MAX_NAME} characters")
    if not isinstance(entry, dict):
        raise InvalidArtifactError(f"{name}: manifest entry must be an object")
    meta = dict(entry)
    shape, layout = meta.pop("shape", None), meta.pop("layout", None)
    if not isinstance(shape, list) or not all(type(n) is int and 0 < n <= MAX_DIM for n in shape):
        raise InvalidArtifactError(f"{name}: shape {shape!r:.60} is not a list of integers in 1..{MAX_DIM}")
    if not isinstance(layout, str) or layout not in ROLES:
        raise InvalidArtifactError(f"{name}: unknown layout {layout!r:.40} (known: {', '.join(ROLES)})")
    if (layout == "dense") != (len(shape) != 2):
        raise InvalidArtifactError(f"{name}: layout {layout} does not fit a {len(shape)}-D tensor")
    return tuple(shape), layout, meta


def check_code(code: ModuleCode) -> None:
    """The stored tensors of one module: roles, dtypes, sizes, drop counts, keys and finite values."""
    _check_roles(code)
    _LAYOUT_CHECKS[code.layout](code)
    for role, tensor in code.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InvalidArtifactError(f"{code.name}: {bad} non-finite value(s) in tensor {role!r}")


def check_decoded(name: str, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """Decoded factors (u [out, K], s [K], v [in, K]) are finite and every delta entry fits MAX_DELTA:
    bounded for factor layouts (svd, qsvd, lora) by sum_k max|u_k| |s_k| max|v_k|, else by max|u| (u is the
    delta itself).
    One pass over each factor: a NaN or Inf makes the bound NaN or Inf, which fails the comparison."""
    if layout in ("svd", "qsvd", "lora"):
        bound = float((_column_peaks(u) * s.double().abs() * _column_peaks(v)).sum())
    else:
        bound = float(_column_peaks(u).max()) if u.numel() else 0.0
    if not bound <= MAX_DELTA:
        raise InvalidArtifactError(
            f"{name}: delta decodes to non-finite values or entries up to {bound:.3g}, "
            f"beyond the servable {MAX_DELTA:g}"
        )


def check_dense(name: str, delta: torch.Tensor) -> None:
    """A decoded delta is finite and within MAX_DELTA."""
    peak = float(_column_peaks(delta.reshape(-1, 1)).max()) if delta.numel() else 0.0
    if not peak <= MAX_DELTA:
        raise InvalidArtifactError(
            f"{name}: delta decodes to non-finite values or entries up to {peak:.3g}, beyond the servable {MAX_DELTA:g}"
        )


def _column_peaks(x: torch.Tensor) -> torch.Tensor:
    """max |x[:, k]| per column, float64 [K] (NaN where a column holds one); zeros for an empty x."""
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1], dtype=torch.float64)
    low, high = torch.aminmax(x, dim=0)
    return torch.maximum(high.double(), -low.double())


def _check_roles(code: ModuleCode) -> None:
    expected = ROLES[code.layout]
    missing, extra = sorted(set(expected) - set(code.tensors)), sorted(set(code.tensors) - set(expected))
    if missing or extra:
        what = f"missing tensor(s) {', '.join(missing)}" if missing else f"unexpected tensor(s) {', '.join(extra)}"
        raise InvalidArtifactError(f"{code.name}: {code.layout} layout with {what}")
    for role, tensor in code.tensors.items():
        if tensor.dtype not in expected[role]:
            raise InvalidArtifactError(
                f"{code.name}: tensor {role!r} is {tensor.dtype}, expected "
                f"{' or '.join(str(d) for d in expected[role])}"
            )


def _size(code: ModuleCode, role: str, expected: tuple[int, ...]) -> None:
    found = tuple(code.tensors[role].shape)
    if found != expected:
        raise InvalidArtifactError(f"{code.name}: tensor {role!r} has shape {list(found)}, expected {list(expected)}")


def _key(code: ModuleCode, field: str) -> None:
    value = code.meta.get(field)
    if not isinstance(value, str) or not 1 <= len(value) <= 16 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise InvalidArtifactError(f"{code.name}: mask key {field!r} must be up to 16 hex digits, not {value!r:.40}")


def _meta_int(code: ModuleCode, field: str, low: int, high: int) -> int:
    value = code.meta.get(field)
    if type(value) is not int or not low <= value <= high:
        raise InvalidArtifactError(f"{code.name}: {field} must be an integer in [{low}, {high}], not {value!r:.40}")
    return value


def _check_svd(code: ModuleCode) -> None:
    rank = code.tensors["s"].numel()
    _size(code, "s", (rank,))
    counts = {}
    for side, rows in (("u", code.shape[0]), ("v", code.shape[1])):
        _key(code, f"{side}_key")
        _size(code, f"{side}_drops", (rank,))
        drops = code.tensors[f"{side}_drops"].long()
        if rank and not (int(drops.min()) >= 0 and int(drops.max()) <= rows):
            raise InvalidArtifactError(f"{code.name}: {side}_drops out of range: each column drops 0..{rows}")
        counts[side] = [rows - d for d in drops.tolist()]
    if code.layout == "svd":
        for side in ("u", "v"):
            _size(code, side, (sum(counts[side]),))
        return
    _check_bit_rule(code)
    bits = column_bits(code)
    for side in ("u", "v"):
        _size(code, side, ((sum(n * b for n, b in zip(counts[side], bits)) + 7) // 8,))
    _size(code, "groups", (sum(n_groups(n) for side in ("u", "v") for n in counts[side]), 2))


def _check_bit_rule(code: ModuleCode) -> None:
    rule = code.meta.get("bit_rule")
    valid = (
        isinstance(rule, list)
        and rule
        and all(
            isinstance(r, list)
            and len(r) == 2
            and (r[0] is None or type(r[0]) is int)
            and type(r[1]) is int
            and 1 <= r[1] <= MAX_BITS
            for r in rule
        )
        and rule[-1][0] is None
    )
    if not valid:
        raise InvalidArtifactError(
            f"{code.name}: bit_rule must be [[below, bits], ..., [null, bits]] with bits 1..{MAX_BITS}"
        )


def _check_sparse(code: ModuleCode) -> None:
    out, inp = code.shape
    _key(code, "key")
    extra = _meta_int(code, "drop_extra", 0, out)
    base = _meta_int(code, "drop_base", 0, inp - (1 if extra else 0))
    kept = out * inp - (base * out + extra)  # codec.sparse_drops() summed, without making the list
    if code.layout == "sparse":
        _size(code, "d", (kept,))
        return
    bits = _meta_int(code, "bits", 1, MAX_BITS)
    _size(code, "d", ((kept * bits + 7) // 8,))
    _size(code, "groups", (n_groups(kept), 2))


def _check_lora(code: ModuleCode) -> None:
    """u [out, r], s [r], v [in, r] with r >= 1."""
    rank = code.tensors["s"].numel()
    if rank < 1:
        raise InvalidArtifactError(f"{code.name}: a lora module needs rank >= 1")
    _size(code, "s", (rank,))
    _size(code, "u", (code.shape[0], rank))
    _size(code, "v", (code.shape[1], rank))


def _check_full(code: ModuleCode) -> None:
    _size(code, "d", code.shape)


def _check_dense(code: ModuleCode) -> None:
    _size(code, "delta", code.shape)


_LAYOUT_CHECKS = {
    "svd": _check_svd,
    "qsvd": _check_svd,
    "sparse": _check_sparse,
    "qsparse": _check_sparse,
    "full": _check_full,
    "dense": _check_dense,
    "lora": _check_lora,
}
