"""Real prompt lengths through the official client: a ~2,000-token system prompt on SmolLM2 spans four
prefill chunks (DELTASERVE_MAX_BATCH_TOKENS 512); its greedy tokens equal transformers', a short request
beside it is unharmed, and a prompt longer than the context is a 400 naming `messages`."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from live import ADMIN_KEY, LiveServer, start_server

from tests.engine.conftest import hf_greedy

KV_BYTES = 128 << 20
"""182 blocks of 16 SmolLM2 tokens: a context of 2,912 tokens."""
SENTENCE = "The archive keeps every ledger of the harbour, sorted by year, ship and cargo. "
STEPS = 8


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(
        smollm2_dir,
        tmp_path_factory.mktemp("long-prompts"),
        DELTASERVE_KV_CACHE_BYTES=str(KV_BYTES),
        DELTASERVE_MAX_BATCH_TOKENS="512",
    )
    yield server
    server.stop()


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=300)


def _messages(repeats: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SENTENCE * repeats},
        {"role": "user", "content": "Which ledgers does the archive keep?"},
    ]


@pytest.mark.slow
def test_a_2000_token_system_prompt_answers_like_transformers(smollm2_server: LiveServer, smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = _messages(120)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert 1900 < len(prompt_ids) < 2400, len(prompt_ids)
    client = _client(smollm2_server)
    with ThreadPoolExecutor(2) as pool:
        long_reply = pool.submit(
            client.chat.completions.create,
            model="smollm2",
            messages=messages,
            max_tokens=STEPS,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        short_reply = pool.submit(
            client.chat.completions.create,
            model="smollm2",
            max_tokens=4,
            temperature=0,
            messages=[{"role": "user", "content": "hi"}],
        )
        reply, short = long_reply.result(), short_reply.result()
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.choices[0].finish_reason == "length" and short.choices[0].finish_reason in ("length", "stop")
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected, _ = hf_greedy(reference, prompt_ids, STEPS)
    assert reply.choices[0].token_ids == expected  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_prompt_longer_than_the_context_is_a_400(smollm2_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _client(smollm2_server).chat.completions.create(model="smollm2", messages=_messages(200), max_tokens=4)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "messages"  # type: ignore[index]
    assert "context" in info.value.body["message"]  # type: ignore[index]
