"""Engine test helpers: an Engine on a tiny model, and a plain transformers twin for reference outputs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from server.config import load_settings
from server.engine.engine import Engine
from server.engine.sources import LocalDirDeltaSource
from server.engine.types import GenerationChunk, GenerationRequest, SamplingParams


def make_engine(base: Path, tasks_dir: Path, **overrides: object) -> Engine:
    settings = load_settings(base_model=str(base), **overrides)
    return Engine(settings, LocalDirDeltaSource(tasks_dir))


@pytest.fixture()
async def tiny_engine(tiny_model: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    engine = make_engine(tiny_model, tmp_path, kv_cache_bytes=4 << 20)
    await engine.start()
    yield engine
    await engine.stop(timeout=1.0)


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


def output_ids(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def run_rows(
    base: Path, tasks_dir: Path, rows: list[tuple[str | None, list[int]]], params: SamplingParams, **overrides: object
) -> list[list[GenerationChunk]]:
    """Every (task, prompt) row submitted at once to one fresh engine (4 MiB of KV, `overrides` on top);
    each row's chunks, in row order. With a `device` override, the model is checked to be on it."""
    engine = make_engine(base, tasks_dir, **({"kv_cache_bytes": 4 << 20} | overrides))
    await engine.start()
    try:
        if "device" in overrides:
            assert engine.model.device.type == torch.device(str(overrides["device"])).type
        requests = [GenerationRequest(f"r{i}", task, tuple(prompt), params) for i, (task, prompt) in enumerate(rows)]
        return list(await asyncio.gather(*(collect(engine, r) for r in requests)))
    finally:
        await engine.stop(timeout=1.0)


def assert_logprobs_match(
    chunks: list[GenerationChunk], tokens: list[int], logits: torch.Tensor, label: object
) -> None:
    """The engine's logprob of each sampled token equals log_softmax of the reference `logits` [steps, vocab]."""
    ours = torch.tensor([lp.logprob for c in chunks for lp in c.logprobs or ()])
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    assert (ours - expected.cpu()).abs().max() < 1e-4, label


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of a transformers model (EOS not special) and its logits at each step: [steps, vocab]."""
    tokens, logits, cache = [], [], None
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        for _ in range(steps):
            out = model(ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]], device=device)
    return tokens, torch.stack(logits)


def random_prompts(n: int, vocab: int) -> list[list[int]]:
    """`n` prompts of 5, 8, 11, ... random token ids below `vocab`, the same for every call."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (5 + 3 * i,), generator=gen).tolist() for i in range(n)]


TASKS = ("alpha", "beta", "gamma", "delta")


def _publish_tasks(base: Path, root: Path, names: tuple[str, ...], seed0: int) -> Path:
    """Synthetic fine-tunes of `base`, ImPart-compressed into root/tasks/<name>.safetensors."""
    from compressor import compress
    from server.model.synthetic import write_synthetic_finetune

    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        tuned = write_synthetic_finetune(base, root / f"ft-{name}", seed=seed0 + i, scale=0.6)
        compress(base, tuned, tasks / f"{name}.safetensors", method="impart", ratio=8.0, seed=i)
    return tasks


@pytest.fixture(scope="session")
def tiny_tasks(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four ImPart artifacts of the tiny (untied) base, named TASKS."""
    return _publish_tasks(tiny_model, tmp_path_factory.mktemp("tiny-tasks"), TASKS, 100)


@pytest.fixture(scope="session")
def tiny_tied_tasks(tiny_tied_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ImPart artifacts of the tiny tied base, named TASKS[:2]."""
    return _publish_tasks(tiny_tied_model, tmp_path_factory.mktemp("tied-tasks"), TASKS[:2], 200)


def merged_hf(base: Path, artifact: Path | None) -> torch.nn.Module:
    """A plain transformers model whose weights are W_base + the artifact's reconstructed delta."""
    from transformers import AutoModelForCausalLM

    from compressor import load_artifact

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if artifact is not None:
        merged = load_artifact(artifact, base).merged_state_dict(load_base_state(base))
        missing, unexpected = model.load_state_dict(merged, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def load_base_state(base: Path) -> dict[str, torch.Tensor]:
    from server.model.llama import load_state_dict

    return load_state_dict(base, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen2 (q/k/v biases) made from the tiny Llama, and a folder with one task "q" on it."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("qwen2")
    base = root / "base"
    shutil.copytree(tiny_model, base)
    (base / "deltaserve-model.json").unlink()
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    for key in ("attention_bias", "mlp_bias"):
        config.pop(key)
    (base / "config.json").write_text(json.dumps(config))
    weights = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for i in range(config["num_hidden_layers"]):
        for name, size in (("q", 64), ("k", 32), ("v", 32)):
            weights[f"model.layers.{i}.self_attn.{name}_proj.bias"] = torch.randn(size, generator=gen) * 0.1
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return base, _publish_tasks(base, root, ("q",), 300)
