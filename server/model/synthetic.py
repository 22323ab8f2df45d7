"""Synthetic models made from a seed, with no download: the `tiny` base and stand-in fine-tunes.

- `write_tiny`: a random Llama-family model with GQA and a byte-level BPE tokenizer trained in-process,
  deterministic from a seed: byte-identical folders for the same seed, for tests, benchmarks and quick
  starts (`deltaserve models tiny`).
- `write_synthetic_finetune`: a base moved by random low-rank updates, a stand-in fine-tune for tests and
  benchmarks.

Both publish through `provision.publish_folder`, so their folders carry the same sha256 manifest.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from server.model.config import ModelConfig
from server.model.provision import MANIFEST, publish_folder, write_json

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# fmt: off
_CORPUS_WORDS = [
    "the", "model", "reads", "a", "task", "and", "writes", "an", "answer", ".", "numbers", "like", "12", "+",
    "30", "=", "42", "and", "dates", "2024-05-17", "appear", "often", ";", "json", "{", '"name"', ":",
    '"value"', "}", "keys", "and", "lists", "[", "1", ",", "2", ",", "3", "]", "too", ".", "user", "assistant",
    "system", "hello", "world", "paris", "france", "capital", "question", "reply",
]
# fmt: on
"""The tiny tokenizer's training words (a word may appear twice: it is drawn more often)."""


def _tiny_corpus(seed: int) -> list[str]:
    """400 lines of 24 words each, drawn from a small fixed vocabulary by `seed`: the BPE's training text."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(24)) for _ in range(400)]


def build_tiny_tokenizer(seed: int, vocab_size: int = 512) -> Tokenizer:
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
    """The tiny base's config.json."""
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
    return publish_folder(lambda tmp: _build_tiny(tmp, seed, tied), dest)


def _build_tiny(tmp: Path, seed: int, tied: bool) -> None:
    import torch
    from safetensors.torch import save_file

    tok = build_tiny_tokenizer(seed)
    vocab = tok.get_vocab_size()
    bos, eos = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    config = tiny_config(vocab, tied) | {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0}
    gen = torch.Generator().manual_seed(seed)
    model = ModelConfig.from_dict(config)
    tensors = _tiny_weights(model, gen)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(tmp / "tokenizer.json"))
    write_json(tmp / "config.json", config)
    write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0})
    write_json(
        tmp / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": model.max_position_embeddings,
        },
    )


def _tiny_weights(model: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights of every tensor of the tiny Llama, by name (norms near one)."""
    import torch

    h, vocab = model.hidden_size, model.vocab_size

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.08).contiguous()

    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h)}
    for i in range(model.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, shape in model.linear_shapes.items():
            out[f"{p}{name}.weight"] = rand(*shape)
        out[f"{p}input_layernorm.weight"] = torch.ones(h) + rand(h) * 0.1
        out[f"{p}post_attention_layernorm.weight"] = torch.ones(h) + rand(h) * 0.1
    if not model.tie_word_embeddings:
        out["lm_head.weight"] = rand(vocab, h)
    return out


def write_synthetic_finetune(base_dir: Path, dest: Path, seed: int, scale: float = 0.05, rank: int = 8) -> Path:
    """A stand-in fine-tune of `base_dir` at `dest`: every 2-D weight moved by a random rank-`rank`
    update (relative size `scale`) plus small noise, every 1-D weight by small noise; config and
    tokenizer files copied. For tests and benchmarks until real fine-tunes exist."""
    return publish_folder(lambda tmp: _build_finetune(Path(base_dir), tmp, seed, scale, rank), dest)


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


def _perturbed(weight: torch.Tensor, gen: torch.Generator, scale: float, rank: int) -> torch.Tensor:
    """`weight` moved by a random rank-`rank` update plus noise (1-D: noise only), `scale` of its std."""
    import torch

    w = weight.float()
    size = float(w.std()) * scale if w.numel() > 1 else scale
    if w.dim() == 1:
        return (w + torch.randn(w.shape, generator=gen) * size).to(weight.dtype).contiguous()
    out_dim, in_dim = w.shape
    left = torch.randn(out_dim, rank, generator=gen)
    right = torch.randn(rank, in_dim, generator=gen)
    update: torch.Tensor = (left @ right) * (size / rank**0.5) + torch.randn(w.shape, generator=gen) * size * 0.1
    return (w + update).to(weight.dtype).contiguous()
