"""The base model through the whole engine agrees with transformers: logits and greedy tokens."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.kv_cache import KVCache
from server.engine.types import GenerationRequest
from server.model.attention import AttentionMeta, PrefillChunk
from server.model.llama import ForwardBatch, LlamaModel
from tests.engine.conftest import collect, greedy, hf_greedy, make_engine, output_ids


def _hf(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _chunked_prefill_logits(model: LlamaModel, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of every position, prefilled in chunks ending at `cuts`: [len(ids), vocab]."""
    kv = KVCache(model.config, 8 << 20, 16, torch.device("cpu"), torch.float32)
    slots = kv.token_slots(kv.allocate(kv.blocks_needed(0, len(ids))), len(ids))
    out, start = [], 0
    for end in cuts:
        meta = AttentionMeta(slots[start:end], None, (PrefillChunk(0, end - start, end, slots[:end]),))
        batch = ForwardBatch(ids[start:end], torch.arange(start, end), torch.arange(end - start), meta)
        out.append(model.forward(batch, kv.layers))
        start = end
    return torch.cat(out)


@pytest.fixture(scope="module")
def tiny_mistral(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's weights as a Mistral with a sliding window far shorter than the test contexts."""
    folder = tmp_path_factory.mktemp("mistral") / "base"
    shutil.copytree(tiny_model, folder)
    (folder / "deltaserve-model.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=WINDOW)
    for key in ("attention_bias", "mlp_bias"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


WINDOW = 6


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_tied_model", "tiny_mistral"])
def test_chunked_prefill_logits_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    model = LlamaModel.from_dir(folder)
    ids = torch.randint(0, model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(3))
    ours = _chunked_prefill_logits(model, ids, [17, 18, 45])
    with torch.no_grad():
        reference = _hf(folder)(ids[None]).logits[0]
    assert (ours - reference).abs().max() < 1e-4


def test_sliding_window_changes_the_logits(tiny_model: Path, tiny_mistral: Path) -> None:
    """The window is applied: past it the Mistral twin differs from the full-attention Llama."""
    llama, mistral = LlamaModel.from_dir(tiny_model), LlamaModel.from_dir(tiny_mistral)
    ids = torch.randint(0, llama.config.vocab_size, (20,), generator=torch.Generator().manual_seed(4))
    full = _chunked_prefill_logits(llama, ids, [20])
    windowed = _chunked_prefill_logits(mistral, ids, [20])
    assert torch.equal(full[:WINDOW], windowed[:WINDOW])
    assert (full[WINDOW:] - windowed[WINDOW:]).abs().max() > 1e-3


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_mistral"])
async def test_concurrent_greedy_matches_transformers_for_64_steps(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tiny_model = request.getfixturevalue(fixture)
    hf = _hf(tiny_model)
    prompts = [[5, 17, 40, 99, 3], list(range(30, 70)), [250, 11]]
    expected = [hf_greedy(hf, p, 64) for p in prompts]
    engine = make_engine(tiny_model, tmp_path, kv_cache_bytes=4 << 20, max_batch_tokens=24)
    await engine.start()
    try:
        requests = [GenerationRequest(f"r{i}", None, tuple(p), greedy(64)) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        await engine.stop(timeout=1.0)
    for chunks, (tokens, _) in zip(results, expected):
        assert output_ids(chunks) == tokens
        assert chunks[-1].finish_reason == "length"


@pytest.mark.slow
async def test_smollm2_logits_and_64_greedy_tokens_match_transformers(smollm2_dir: Path, tmp_path: Path) -> None:
    hf = _hf(smollm2_dir)
    engine = make_engine(smollm2_dir, tmp_path, kv_cache_bytes=32 << 20)
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    tokens, hf_logits = hf_greedy(hf, prompt, 64)
    del hf
    await engine.start()
    try:
        chunks = await collect(engine, GenerationRequest("s", None, tuple(prompt), greedy(64, logprobs=0)))
        logits = _chunked_prefill_logits(engine.model, torch.tensor(prompt), [len(prompt)])[-1]
    finally:
        await engine.stop(timeout=1.0)
    assert output_ids(chunks) == tokens
    assert (logits - hf_logits[0]).abs().max() < 1e-4
