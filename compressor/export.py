"""`reconstruct`: base + an artifact's delta written as a full HF checkpoint, shard by shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from compressor.artifact import load_artifact
from compressor.checkpoint import INDEX_FILE, Checkpoint

SKIPPED = {"deltaserve-model.json"}


def reconstruct(artifact_path: Path | str, base_dir: Path | str, out_dir: Path | str) -> Path:
    """Write W_base + delta for every tensor into out_dir, keeping the base's file layout and its
    config and tokenizer files. Memory: one base shard at a time."""
    base, out = Path(base_dir), Path(out_dir)
    artifact = load_artifact(artifact_path, base_dir=base)
    out.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in SKIPPED | {INDEX_FILE}:
            shutil.copy2(path, out / path.name)
    checkpoint = Checkpoint(base)
    by_file: dict[Path, list[str]] = {}
    for name, info in checkpoint.infos.items():
        by_file.setdefault(info.file, []).append(name)
    for file, names in sorted(by_file.items()):
        shard = {n: checkpoint.tensor(n) for n in names}
        save_file(artifact.merged_state_dict(shard), str(out / file.name), metadata={"format": "pt"})
    if (base / INDEX_FILE).is_file():
        shutil.copy2(base / INDEX_FILE, out / INDEX_FILE)
    (out / "deltaserve-reconstructed.json").write_text(
        json.dumps({"artifact_method": artifact.method, "base_fingerprint": artifact.manifest["base_fingerprint"]})
    )
    return out
