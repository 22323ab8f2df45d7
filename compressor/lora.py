"""A PEFT LoRA adapter -> an artifact (method "lora"), stored exactly, no compression step.

Each adapted module's delta is B A * scaling, already in factor form: the "lora" layout keeps
u = B [out, r], s = scaling [r] (lora_alpha / r, or / sqrt(r) with `use_rslora`), v = A^T [in, r].
Embedding LoRA (`lora_embedding_A` [r, vocab], `lora_embedding_B` [hidden, r]) has delta (B A)^T,
so u = A^T, v = B. `rank_pattern` / `alpha_pattern` apply per module as PEFT matches them; a fused
projection (`qkv_proj`, `gate_up_proj`) is split into the base's parts by rows of B. Whole weights
(`modules_to_save`, saved embeddings) become full float32 deltas (1-D ones dense). The base's shapes
decide (`base_model_name_or_path` is advisory). With `ratio`, every delta is compressed instead
(ImPart or LowRank) for a smaller, no longer exact artifact.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import regex
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from compressor.checkpoint import Checkpoint
from compressor.codec import ModuleCode
from compressor.errors import AdapterError
from compressor.methods import MethodParams, encode_dense
from compressor.pipeline import (
    ADAPTER_METHODS,
    CompressionReport,
    ModuleReport,
    encode_tensor,
    group_of,
    write_artifact,
)
from compressor.summary import ideal_bytes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""Fused projection names of some architectures -> the base's unfused parts, in row order."""
MUST_BE_OFF = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "use_qalora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
)
"""Config fields whose adapters are not B A * scaling on the base's own weights: refused when set."""
LORA_ROLES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
Number = TypeVar("Number", int, float)
PATTERN_TIMEOUT_S = 0.05
"""Longest one rank/alpha pattern may take to match one module name (ordinary patterns take microseconds)."""


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json that decide the delta."""

    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    params: dict[str, object]
    """What the manifest records (r, alpha, patterns, targets, modules_to_save, the advisory base name)."""

    def rank(self, module: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module, "rank_pattern"), self.r)

    def scaling(self, module: str, rank: int) -> float:
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module, "alpha_pattern"), self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


@dataclass
class LoraModule:
    """One adapted module's factors as saved: A [r, in] (or [r, vocab]), B [out, r] (or [hidden, r])."""

    name: str
    embedding: bool
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None


def _pattern_key(patterns: Mapping[str, object], module: str, field: str) -> str:
    """PEFT's match: the first pattern that matches the module name's tail at a dot boundary. Patterns
    come from the uploader, so each match is bounded in time (the `regex` package, which transformers
    already needs, releasing the GIL while it matches; `re` cannot be interrupted and holds the GIL,
    stalling every thread of the server)."""
    for key in patterns:
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_TIMEOUT_S, concurrent=True):
                return key
        except TimeoutError:
            raise AdapterError(f"{field}: {key[:60]!r} takes too long to match a module name", field) from None
    return module


def read_config(path: Path) -> AdapterConfig:
    """Parse and check adapter_config.json; AdapterError naming the field on anything unsupported."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not readable JSON ({type(exc).__name__})", CONFIG_FILE) from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_FILE} must be a JSON object, not {type(raw).__name__}", CONFIG_FILE)
    _check_supported(raw)
    r = _field(raw, "r", _an_int, "an integer")
    alpha = _field(raw, "lora_alpha", _a_finite, "a finite number")
    if r < 1:
        raise AdapterError(f"r must be >= 1, not {r}", "r")
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError("use_rslora must be true or false", "use_rslora")
    ranks = _pattern(raw, "rank_pattern", _a_rank, "integers >= 1")
    alphas = _pattern(raw, "alpha_pattern", _a_finite, "finite numbers")
    _check_targets(raw)
    params = {
        k: raw.get(k)
        for k in (
            "r",
            "lora_alpha",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "target_modules",
            "modules_to_save",
            "base_model_name_or_path",
        )
    }
    return AdapterConfig(r, alpha, rslora, ranks, alphas, params)


def _check_supported(raw: dict[str, object]) -> None:
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {raw.get('peft_type')!r:.40} is not LORA", "peft_type")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f'bias {raw.get("bias")!r:.40} is not supported: only "none"', "bias")
    for key in MUST_BE_OFF:
        if raw.get(key):
            raise AdapterError(f"{key} is not supported (only plain LoRA: B A * scaling)", key)


def _an_int(value: object) -> int | None:
    """value when it is an int (a bool is not), else None."""
    return value if type(value) is int else None


def _a_finite(value: object) -> float | None:
    """value when it is an int or a finite float (a bool is neither), else None."""
    return value if type(value) is int or (type(value) is float and math.isfinite(value)) else None


def _a_rank(value: object) -> int | None:
    """value when it is an int >= 1, else None."""
    number = _an_int(value)
    return number if number is not None and number >= 1 else None


def _field(raw: dict[str, object], key: str, valid: Callable[[object], Number | None], wanted: str) -> Number:
    """raw[key] when `valid` takes it; AdapterError naming the field otherwise."""
    value = valid(raw.get(key))
    if value is None:
        raise AdapterError(f"{key} must be {wanted}, not {raw.get(key)!r:.40}", key)
    return value


def _pattern(
    raw: dict[str, object], key: str, valid: Callable[[object], Number | None], wanted: str
) -> dict[str, Number]:
    """A {module pattern: value} field: every pattern a valid regex, every value taken by `valid`."""
    table = {} if raw.get(key) is None else raw.get(key)
    if not isinstance(table, dict):
        raise AdapterError(f"{key} must be an object of module pattern -> value", key)
    out: dict[str, Number] = {}
    for pattern, number in table.items():
        _regex(pattern, key)
        value = valid(number)
        if value is None:
            raise AdapterError(f"{key} values must be {wanted}, not {number!r:.40}", key)
        out[pattern] = value
    return out


def _regex(pattern: object, key: str) -> None:
    try:
        re.compile(str(pattern))
    except re.error as exc:
        raise AdapterError(f"{key}: {str(pattern)[:60]!r} is not a valid pattern ({exc})", key) from None


def _check_targets(raw: dict[str, object]) -> None:
    for key in ("target_modules", "modules_to_save"):
        value = raw.get(key)
        if value is None or (key == "target_modules" and isinstance(value, str)):
            _regex(value or "", key)
        elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise AdapterError(f"{key} must be a list of module names{' or a regex' * (key == 'target_modules')}", key)


def read_weights(path: Path) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    """(LoRA modules by module name, whole weights by base tensor name) of adapter_model.safetensors."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file ({exc})", WEIGHTS_FILE) from None
    modules: dict[str, LoraModule] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        role = next(((suffix, r) for suffix, r in LORA_ROLES.items() if name.endswith(suffix)), None)
        if role is None:
            _add_whole(whole, name, tensor)
            continue
        (suffix, (side, embedding)) = role
        module = modules.setdefault(name[: -len(suffix)], LoraModule(name[: -len(suffix)], embedding))
        setattr(module, side.lower(), tensor)
    return modules, whole


def _add_whole(whole: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    if ".lora_" in name and name.endswith(".bias"):
        raise AdapterError(f"{name}: LoRA biases are not supported", "lora_bias")
    if ".lora_" in name:
        raise AdapterError(
            f"{name[:120]}: not a LoRA factor name PEFT saves (lora_A.weight, lora_B.weight, "
            f"lora_embedding_A, lora_embedding_B)",
            WEIGHTS_FILE,
        )
    if ".original_module." in name:
        return
    whole[
        name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".").replace(".base_layer.", ".")
    ] = tensor


def lora_codes(modules: dict[str, LoraModule], config: AdapterConfig, base: Checkpoint) -> list[ModuleCode]:
    """One "lora" code per adapted base tensor (a fused module gives one per part)."""
    codes = []
    for module in modules.values():
        a, b, rank = _factors_of(module, config)
        parts = _parts(module.name, base)
        out_dims = [base.infos[p].shape[0] for p in parts]
        in_dim = base.infos[parts[0]].shape[1]
        u_all, v = (a.t(), b) if module.embedding else (b, a.t())
        if u_all.shape[0] != sum(out_dims) or v.shape[0] != in_dim:
            raise AdapterError(
                f"{module.name}: factors B {list(b.shape)}, A {list(a.shape)} do not fit the base's "
                f"{[list(base.infos[p].shape) for p in parts]}",
                WEIGHTS_FILE,
            )
        s = torch.full((rank,), config.scaling(module.name, rank), dtype=torch.float32)
        for part, u in zip(parts, torch.split(u_all, out_dims)):
            codes.append(_lora_code(part, tuple(base.infos[part].shape), u, s, v))
    return codes


def _factors_of(module: LoraModule, config: AdapterConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A [r, in], B [out, r], r), checked against each other and the config's rank for the module."""
    a, b = module.a, module.b
    if a is None or b is None:
        raise AdapterError(f"{module.name}: lora_{'A' if a is None else 'B'} is missing", WEIGHTS_FILE)
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise AdapterError(f"{module.name}: A {list(a.shape)} and B {list(b.shape)} are not LoRA factors", WEIGHTS_FILE)
    rank = int(a.shape[0])
    if rank != config.rank(module.name):
        field = "rank_pattern" if rank != config.r else "r"
        raise AdapterError(f"{module.name}: factors of rank {rank}, the config says {config.rank(module.name)}", field)
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{module.name}: factors must be floating point, not {a.dtype}", WEIGHTS_FILE)
    return a, b, rank


def _parts(module: str, base: Checkpoint) -> list[str]:
    """The base tensor(s) an adapted module names: itself, or a fused projection's parts."""
    if f"{module}.weight" in base.infos:
        return [f"{module}.weight"]
    stem, _, leaf = module.rpartition(".")
    parts = [f"{stem}.{p}.weight" for p in FUSED.get(leaf, ())]
    if parts and all(p in base.infos for p in parts):
        return parts
    raise AdapterError(f"the adapter targets {module!r:.120}, a module the base lacks", "target_modules")


def _lora_code(name: str, shape: tuple[int, ...], u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> ModuleCode:
    """u [out, r], s [r], v [in, r]; factors kept in their saved dtype when it is a 16-bit float."""
    dtype = u.dtype if u.dtype in (torch.float16, torch.bfloat16) else torch.float32
    tensors = {
        "u": u.to(dtype).clone(),
        "s": s.clone(),
        "v": v.to(dtype).clone(),
    }  # parts of a fused module: own copies
    return ModuleCode(name, shape, "lora", tensors)


def whole_codes(whole: dict[str, torch.Tensor], base: Checkpoint, taken: set[str]) -> list[ModuleCode]:
    """Whole saved weights (modules_to_save, saved embeddings) as float32 deltas; unchanged ones are skipped."""
    codes = []
    for name, tensor in sorted(whole.items()):
        if name not in base.infos:
            raise AdapterError(f"the adapter saves {name!r:.120}, a tensor the base lacks", "modules_to_save")
        if tuple(tensor.shape) != tuple(base.infos[name].shape) or not tensor.is_floating_point():
            raise AdapterError(
                f"{name}: saved {list(tensor.shape)} {tensor.dtype} does not fit the base's "
                f"{list(base.infos[name].shape)}",
                "modules_to_save",
            )
        delta = tensor.to(torch.float32) - base.tensor(name).to(torch.float32)
        if not bool(delta.any()):
            continue
        if name in taken:
            raise AdapterError(f"{name}: both a LoRA and a changed whole weight", "modules_to_save")
        codes.append(
            encode_dense(name, delta)
            if delta.ndim != 2
            else ModuleCode(name, tuple(delta.shape), "full", {"d": delta.contiguous()})
        )
    return codes


def import_lora(
    adapter_dir: Path | str,
    base_dir: Path | str,
    out_path: Path | str,
    ratio: float | None = None,
    method: str = "impart",
    seed: int = 0,
) -> CompressionReport:
    """Write the PEFT adapter in adapter_dir as an artifact against base_dir; see the module docstring."""
    started, folder = time.perf_counter(), Path(adapter_dir)
    config = read_config(folder / CONFIG_FILE)
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterError(f"the adapter has no {WEIGHTS_FILE} (pickled .bin weights are not read)", WEIGHTS_FILE)
    modules, whole = read_weights(folder / WEIGHTS_FILE)
    base = Checkpoint(base_dir)
    codes = lora_codes(modules, config, base)
    codes += whole_codes(whole, base, {c.name for c in codes})
    if not codes:
        raise AdapterError("the adapter changes no weight of the base", WEIGHTS_FILE)
    params: dict[str, object] = {**config.params, "ratio": None}
    if ratio is not None:
        codes, reports = _compressed(codes, method, ratio, seed)
        params.update(ratio=ratio, compressed_with=method, seed=seed)
    else:
        reports = [_exact_report(code) for code in codes]
    return write_artifact(codes, reports, base_dir, "lora", params, Path(out_path), started)


def _exact_report(code: ModuleCode) -> ModuleReport:
    group = group_of(code.name, len(code.shape))
    return ModuleReport(code.name, code.shape, group, code.layout, code.rank, code.kept, 0.0, ideal_bytes(code))


def _compressed(
    codes: list[ModuleCode], method: str, ratio: float, seed: int
) -> tuple[list[ModuleCode], list[ModuleReport]]:
    """Every delta re-encoded with ImPart or LowRank at `ratio` (1-D deltas stay dense)."""
    from compressor.codec import decode_dense

    if method not in ADAPTER_METHODS:
        raise AdapterError(f"method {method!r:.40} cannot compress an adapter: {', '.join(ADAPTER_METHODS)}", "method")
    if not (math.isfinite(ratio) and ratio > 1.0):
        raise AdapterError(f"ratio must be a finite number > 1, not {ratio!r:.40}", "ratio")
    params = MethodParams(ratio=float(ratio), seed=seed)
    pairs = [encode_tensor(code.name, decode_dense(code), method, params) for code in codes]
    return [c for c, _ in pairs], [r for _, r in pairs]
