"""Crafted artifacts and checkpoint folders, as a fuzzing user makes them: every edit is re-sealed with a
valid checksum (the checksum is no secret), so only a full validation can catch it."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from compressor.artifact import CHECKSUM_KEY, MANIFEST_KEY, _checksum

Tensors = dict[str, torch.Tensor]
DEEP = 100_000
"""Nesting that Python's JSON parser cannot follow (RecursionError, not JSONDecodeError)."""


@dataclass(frozen=True)
class Replace:
    """What an edit returns to put another JSON value in place of the whole manifest."""

    manifest: object


Edit = Callable[[dict, Tensors, random.Random], "Replace | None"]
"""Edits the manifest and tensors in place, or returns a Replace."""


def header_of(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])


def with_header(data: bytes, header: dict) -> bytes:
    """The same tensor bytes under another safetensors header."""
    (size,) = struct.unpack("<Q", data[:8])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def rewrite_manifest(data: bytes, edit: dict[str, object]) -> bytes:
    """The manifest with some fields replaced, the checksum left as it was (so it no longer matches)."""
    header = header_of(data)
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    header["__metadata__"][MANIFEST_KEY] = json.dumps({**manifest, **edit})
    return with_header(data, header)


def seal(manifest: object, tensors: Tensors) -> bytes:
    """An artifact file of these tensors and this manifest, with a checksum that matches."""
    text = json.dumps(manifest, sort_keys=True)
    return st_save(tensors, metadata={MANIFEST_KEY: text, CHECKSUM_KEY: _checksum(text, tensors)})


def craft(good: bytes, edit: Edit, rng: random.Random) -> bytes:
    """`good` with `edit` applied to its manifest and tensors, re-sealed."""
    manifest = json.loads(header_of(good)["__metadata__"][MANIFEST_KEY])
    tensors = {k: v.clone() for k, v in st_load(good).items()}
    replaced = edit(manifest, tensors, rng)
    return seal(manifest if replaced is None else replaced.manifest, tensors)


def _pick(tensors: Tensors, rng: random.Random, roles: tuple[str, ...]) -> str:
    keys = sorted(k for k in tensors if k.rpartition(":")[2] in roles and tensors[k].numel() > 0)
    return rng.choice(keys)


def _poke(value: float) -> Edit:
    def edit(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
        key = _pick(tensors, rng, ("s", "u", "v", "d", "delta", "groups"))
        if tensors[key].dtype == torch.uint8:
            key = _pick(tensors, rng, ("s", "delta", "groups"))
        flat = tensors[key].view(-1)
        flat[rng.randrange(flat.numel())] = value

    return edit


def _drop_role(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    del tensors[_pick(tensors, rng, ("s", "u", "v", "u_drops", "v_drops", "d", "delta", "groups"))]


def _reshape_factor(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    key = _pick(tensors, rng, ("s", "u", "v", "d", "delta"))
    t = tensors[key]
    tensors[key] = t.reshape(-1)[:-1].clone() if rng.random() < 0.5 else torch.cat([t.reshape(-1), t.reshape(-1)[:1]])


def _drops_out_of_range(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    key = _pick(tensors, rng, ("u_drops", "v_drops"))
    name, _, role = key.rpartition(":")
    shape = manifest["modules"][name]["shape"]
    rows = shape[0] if role == "u_drops" else shape[1]
    drops = tensors[key].long()
    drops[rng.randrange(drops.numel())] = rows + 1 + rng.randrange(100)
    tensors[key] = drops.to(tensors[key].dtype)


def _sparse_drops_out_of_range(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    entry = manifest["modules"][rng.choice(sorted(n for n, e in manifest["modules"].items() if "drop_base" in e))]
    entry["drop_base" if rng.random() < 0.5 else "drop_extra"] = entry["shape"][1] + 1 + rng.randrange(50)


def _extra_tensor(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    name = rng.choice(sorted(manifest["modules"]))
    tensors[rng.choice([f"{name}:extra", "stray.weight:u", "no-role"])] = torch.zeros(3)


def _wrong_dtype(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    key = _pick(tensors, rng, ("s", "u", "v", "d", "delta", "u_drops", "v_drops"))
    tensors[key] = tensors[key].to(torch.float64 if not tensors[key].is_floating_point() else torch.int32)


def _huge_singular_value(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    tensors[_pick(tensors, rng, ("s", "delta"))].view(-1)[0] = 1e30


def _bad_mask_key(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    entry = manifest["modules"][rng.choice(sorted(n for n, e in manifest["modules"].items() if "u_key" in e))]
    entry[rng.choice(["u_key", "v_key"])] = rng.choice(["zz", "", 7, None, "1" * 17])


def _wrong_base(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    manifest["base_fingerprint"] = f"{rng.getrandbits(256):064x}"


def _module_not_in_base(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    name = rng.choice(sorted(manifest["modules"]))
    manifest["modules"][f"{name}.renamed"] = manifest["modules"].pop(name)
    for key in [k for k in tensors if k.rpartition(":")[0] == name]:
        tensors[f"{name}.renamed:{key.rpartition(':')[2]}"] = tensors.pop(key)


def _shape_not_the_bases(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    """A shape far larger than the base's (decoding it unchecked would allocate without bound)."""
    entry = manifest["modules"][rng.choice(sorted(manifest["modules"]))]
    entry["shape"] = [n * rng.choice([2, 1000, 2**20]) for n in entry["shape"]]


def _bad_entry(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    name = rng.choice(sorted(manifest["modules"]))
    entry = manifest["modules"][name]
    choice = rng.randrange(4)
    if choice == 0:
        manifest["modules"][name] = [["shape", entry["shape"]], ["layout", entry["layout"]]]
    elif choice == 1:
        entry["layout"] = "mystery"
    elif choice == 2:
        entry["shape"] = [-1] + entry["shape"][1:]
    else:
        entry["shape"] = [str(n) for n in entry["shape"]]


def _bad_field(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    field, value = rng.choice(
        [
            ("ratio", "thirty-two"),
            ("ratio", float("nan")),
            ("quality", [1, 2]),
            ("quality", {"x": float("inf")}),
            ("params", [1]),
            ("method", 3),
            ("modules", []),
            ("modules", None),
            ("params", None),
        ]
    )
    manifest[field] = value


def _qsvd_bit_rule(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    names = sorted(n for n, e in manifest["modules"].items() if "bit_rule" in e)
    entry = manifest["modules"][rng.choice(names)]
    entry["bit_rule"] = rng.choice([[], [[2, 0], [None, 2]], [[2, 9], [None, 2]], [[2, 8]], "8"])


FUZZ_VALUES = [
    None,
    True,
    0,
    -1,
    1,
    2**70,
    1.5,
    float("nan"),
    "",
    "x",
    "ff",
    [],
    [1],
    [[1]],
    {},
    {"a": 1},
    [2, 3],
    [64, 64],
    [-5],
    "svd",
    "qsvd",
    "sparse",
    "dense",
    "full",
]


def random_edit(manifest: dict, tensors: Tensors, rng: random.Random) -> None:
    """One random edit: a manifest field, a module entry's field, or a tensor's dtype, shape or size."""
    roll = rng.random()
    if roll < 0.3:
        manifest[rng.choice([*manifest, "new"])] = rng.choice(FUZZ_VALUES)
    elif roll < 0.8:
        entry = manifest["modules"][rng.choice(sorted(manifest["modules"]))]
        entry[rng.choice([*entry, "bits", "drop_base", "drop_extra", "bit_rule", "key"])] = rng.choice(FUZZ_VALUES)
    else:
        key = rng.choice(sorted(tensors))
        t = tensors[key]
        tensors[key] = rng.choice(
            [
                t.to(torch.float32),
                t.to(torch.uint8),
                t.reshape(1, -1),
                torch.zeros(0),
                t[: t.numel() // 2],
                torch.zeros(5, 5),
            ]
        )


ARTIFACT_EDITS: dict[str, Edit] = {
    "nan": _poke(float("nan")),
    "inf": _poke(float("inf")),
    "-inf": _poke(float("-inf")),
    "missing factor": _drop_role,
    "wrong factor shape": _reshape_factor,
    "drop index out of range": _drops_out_of_range,
    "extra tensor": _extra_tensor,
    "wrong dtype": _wrong_dtype,
    "beyond the servable range": _huge_singular_value,
    "bad mask key": _bad_mask_key,
    "wrong base": _wrong_base,
    "module not in the base": _module_not_in_base,
    "shape not the base's": _shape_not_the_bases,
    "bad module entry": _bad_entry,
    "bad manifest field": _bad_field,
    "manifest a list": lambda m, t, r: Replace([m]),
    "manifest a string": lambda m, t, r: Replace("deltaserve-artifact"),
    "manifest null": lambda m, t, r: Replace(None),
}
"""Edits for svd-layout artifacts (ImPart, LowRank)."""
SPARSE_EDITS: dict[str, Edit] = {"sparse drops out of range": _sparse_drops_out_of_range}
QSVD_EDITS: dict[str, Edit] = {"bad bit rule": _qsvd_bit_rule}


def raw_damage(good: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Damage no re-sealing hides: truncation, a flipped byte, metadata that is not a string."""
    kind = rng.choice(
        [
            "truncated",
            "flipped byte",
            "metadata value not a string",
            "header not an object",
            "manifest nested past the parser's depth",
        ]
    )
    if kind == "truncated":
        return kind, good[: rng.randrange(len(good))]
    if kind == "flipped byte":
        flipped = bytearray(good)
        flipped[rng.randrange(8 + 8, len(good))] ^= 1 << rng.randrange(8)
        return kind, bytes(flipped)
    header = header_of(good)
    if kind == "manifest nested past the parser's depth":
        header["__metadata__"][MANIFEST_KEY] = "[" * DEEP + "]" * DEEP
        return kind, with_header(good, header)
    if kind == "header not an object":
        return kind, with_header(good, [header])  # type: ignore[arg-type]
    header["__metadata__"][rng.choice([MANIFEST_KEY, CHECKSUM_KEY, "other"])] = rng.choice([1, {"a": 1}, None, ["x"]])
    return kind, with_header(good, header)


def checkpoint_edits(outside: Path) -> dict[str, Callable[[Path], None]]:
    """Edits of a sharded checkpoint folder (index + shards + config.json) that must be refused;
    `outside` is a real safetensors file outside the folder."""

    def index(value: object) -> Callable[[Path], None]:
        return lambda folder: (folder / "model.safetensors.index.json").write_text(json.dumps(value))

    def entry(value: object) -> Callable[[Path], None]:
        def edit(folder: Path) -> None:
            path = folder / "model.safetensors.index.json"
            parsed = json.loads(path.read_text())
            first = sorted(parsed["weight_map"])[0]
            parsed["weight_map"][first] = value
            path.write_text(json.dumps(parsed))

        return edit

    def link_out(folder: Path) -> None:
        shard = sorted(folder.glob("*.safetensors"))[0]
        shard.unlink()
        shard.symlink_to(outside)

    return {
        "absolute path": entry(str(outside)),
        "dot-dot": entry(f"../{outside.parent.name}/{outside.name}"),
        "sub folder": entry(f"sub/{outside.name}"),
        "backslash": entry("..\\model.safetensors"),
        "not uploaded": entry("model-00009-of-00009.safetensors"),
        "not a string": entry(["a.safetensors"]),
        "index a list": index([]),
        "index a string": index("model.safetensors"),
        "weight_map null": index({"weight_map": None}),
        "weight_map a list": index({"weight_map": ["x"]}),
        "weight_map missing": index({"metadata": {}}),
        "symlink out": link_out,
        "config a list": lambda folder: (folder / "config.json").write_text("[]"),
        "config null": lambda folder: (folder / "config.json").write_text("null"),
        "config a string": lambda folder: (folder / "config.json").write_text('"llama"'),
        "config not json": lambda folder: (folder / "config.json").write_text("{"),
        "config nested past the parser's depth": lambda folder: (folder / "config.json").write_text(
            "[" * DEEP + "]" * DEEP
        ),
    }
