"""Constrained decoding, logit bias and n inside the engine: a row's grammar mask touches only its row,
constrained output validates, a grammar failure ends only its request, and n choices share the prefill."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr

from server.engine.engine import Engine
from server.engine.grammar import Grammars
from server.engine.sampler import RowState, sample
from server.engine.types import (
    GenerationRequest,
    GrammarSpec,
    InvalidRequestError,
    RequestFailedError,
    SamplingParams,
)
from tests.engine.conftest import TASKS, collect, greedy, make_engine, output_ids

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["invoice", "receipt", "other"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
    },
    "required": ["name", "ok", "kind", "scores"],
    "additionalProperties": False,
}
SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))
PROMPT = tuple(range(5, 29))


@pytest.fixture()
async def engine(tiny_model: Path, tiny_tasks: Path) -> AsyncIterator[Engine]:
    engine = make_engine(tiny_model, tiny_tasks, kv_cache_bytes=8 << 20)
    await engine.start()
    yield engine
    await engine.stop(timeout=1.0)


def _text(chunks: list) -> str:
    return "".join(c.text for c in chunks)


async def test_constrained_rows_validate_and_free_rows_are_untouched_in_one_mixed_batch(engine: Engine) -> None:
    free = [GenerationRequest(f"free-{t}", t, PROMPT[i:], greedy(24)) for i, t in enumerate((*TASKS[2:], None))]
    alone = [output_ids(await collect(engine, r)) for r in free]
    constrained = [
        GenerationRequest(
            f"json-{i}",
            (TASKS[0], TASKS[1], None)[i % 3],
            PROMPT[i:],
            SamplingParams(temperature=(0.0, 0.7, 1.0, 1.3)[i % 4], seed=i, max_tokens=160, grammar=SPEC),
        )
        for i in range(8)
    ]
    runs = await asyncio.gather(*(collect(engine, r) for r in [*constrained, *free]))
    for chunks in runs[:8]:
        assert chunks[-1].finish_reason == "stop", _text(chunks)
        jsonschema.validate(json.loads(_text(chunks)), SCHEMA)
    assert [output_ids(chunks) for chunks in runs[8:]] == alone


async def test_json_object_regex_and_choice_grammars_hold(engine: Engine) -> None:
    cases = [
        (GrammarSpec("regex", r"[0-9]{3}-[a-z]{2,4}", "guided_regex"), r"^[0-9]{3}-[a-z]{2,4}$"),
        (GrammarSpec("choice", json.dumps(["yes", "no", "maybe so"]), "guided_choice"), r"^(yes|no|maybe so)$"),
    ]
    for seed in range(4):
        for spec, pattern in cases:
            chunks = await collect(
                engine,
                GenerationRequest(
                    f"{spec.kind}-{seed}",
                    TASKS[0],
                    PROMPT,
                    SamplingParams(temperature=1.0, seed=seed, max_tokens=40, grammar=spec),
                ),
            )
            assert chunks[-1].finish_reason == "stop"
            assert re.match(pattern, _text(chunks)), _text(chunks)
    stopped = 0
    for seed in range(6):
        chunks = await collect(
            engine,
            GenerationRequest(
                f"obj-{seed}",
                None,
                PROMPT[seed:],
                SamplingParams(
                    temperature=(0.0, 0.7, 1.0)[seed % 3], seed=seed, max_tokens=200, grammar=GrammarSpec("json_object")
                ),
            ),
        )
        if chunks[-1].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(_text(chunks)), dict), _text(chunks)
    assert stopped >= 3  # a random model's object may run past max_tokens; the seeds here end 5 of 6


def test_the_mask_and_bias_change_only_their_own_rows(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    grammars = Grammars(AutoTokenizer.from_pretrained(tiny_model), 413, (2,), 4, 5.0)
    compiled = asyncio.run(grammars.compiled(GrammarSpec("regex", "7+", "guided_regex")))
    seven = AutoTokenizer.from_pretrained(tiny_model).encode("7", add_special_tokens=False)
    logits = torch.randn(4, 413, generator=torch.Generator().manual_seed(0))
    rows = [
        RowState(greedy(4), [], None),
        RowState(greedy(4), [], None, grammars.matcher(compiled)),
        RowState(greedy(4, logit_bias=((11, 100.0),)), [], None),
        RowState(greedy(4), [], None),
    ]
    tokens = [s.token for s in sample(logits.clone(), rows, str)]  # type: ignore[union-attr]
    raw = logits.argmax(dim=-1).tolist()
    assert tokens[0] == raw[0] and tokens[3] == raw[3]
    assert tokens[1] == seven[0] and tokens[2] == 11
    grammars.close()


async def test_logit_bias_bans_and_forces_tokens(engine: Engine) -> None:
    plain = output_ids(await collect(engine, GenerationRequest("plain", TASKS[0], PROMPT, greedy(8))))
    banned = tuple((t, -100.0) for t in set(plain))
    other = output_ids(await collect(engine, GenerationRequest("ban", TASKS[0], PROMPT, greedy(8, logit_bias=banned))))
    assert not set(other) & set(plain)
    forced = output_ids(
        await collect(engine, GenerationRequest("force", None, PROMPT, greedy(8, logit_bias=((77, 100.0),))))
    )
    assert forced == [77] * 8


async def test_an_uncompilable_grammar_is_invalid_request_naming_its_field(engine: Engine) -> None:
    bad = (GrammarSpec("json_schema", json.dumps({"type": "strin"})), GrammarSpec("regex", "[a-", "guided_regex"))
    for spec in bad:
        with pytest.raises(InvalidRequestError) as refused:
            await collect(engine, GenerationRequest("bad", None, PROMPT, SamplingParams(grammar=spec)))
        assert refused.value.param == spec.param
    with pytest.raises(InvalidRequestError) as refused:
        await collect(engine, GenerationRequest("bias", None, PROMPT, greedy(2, logit_bias=((10**6, 1.0),))))
    assert refused.value.param == "logit_bias"


async def test_compiled_grammars_are_cached_per_spec_in_a_bounded_lru(tiny_model: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model, tmp_path, kv_cache_bytes=4 << 20, grammar_cache_size=2)
    await engine.start()
    try:
        specs = [GrammarSpec("regex", f"a{{{i}}}", "guided_regex") for i in range(1, 4)]
        first = await engine.core.grammars.compiled(specs[0])
        assert await engine.core.grammars.compiled(specs[0]) is first
        for spec in specs[1:]:
            await engine.core.grammars.compiled(spec)
        assert engine.core.grammars.cached() == 2 and await engine.core.grammars.compiled(specs[0]) is not first
    finally:
        await engine.stop(timeout=1.0)


class _FailingMatcher:
    """A matcher whose grammar breaks on its third step (a grammar error mid-run)."""

    def __init__(self, inner: xgr.GrammarMatcher) -> None:
        self.inner, self.steps = inner, 0

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("grammar state broken")
        self.inner.fill_next_token_bitmask(bitmask, index)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_a_grammar_failing_mid_run_fails_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = engine.core.grammars.matcher
    monkeypatch.setattr(engine.core.grammars, "matcher", lambda g: _FailingMatcher(make(g)))
    others = [GenerationRequest(f"other-{t}", t, PROMPT, greedy(12)) for t in (TASKS[0], None)]
    alone = [output_ids(await collect(engine, r)) for r in others]
    broken = GenerationRequest("broken", TASKS[0], PROMPT, SamplingParams(max_tokens=40, grammar=SPEC))
    runs = await asyncio.gather(collect(engine, broken), *(collect(engine, r) for r in others), return_exceptions=True)
    assert isinstance(runs[0], RequestFailedError)
    assert [output_ids(chunks) for chunks in runs[1:]] == alone  # type: ignore[arg-type]
    assert engine.stats().failed_requests == 1


async def test_n_choices_share_the_prefill_and_reproduce_their_seeds(engine: Engine) -> None:
    prompt = tuple(range(5, 60))  # 55 tokens: three full blocks of 16
    params = SamplingParams(temperature=1.0, seed=41, max_tokens=12, ignore_eos=True)
    before = engine.stats().prefix_cache_hit_tokens
    items = [item async for item in engine.generate_choices(GenerationRequest("n3", TASKS[1], prompt, params), 3)]
    assert engine.stats().prefix_cache_hit_tokens - before == 2 * 48
    by_choice = {i: [t for j, c in items if j == i for t in c.token_ids] for i in range(3)}
    assert [sum(1 for j, c in items if j == i and c.finish_reason == "length") for i in range(3)] == [1, 1, 1]
    for i in range(3):
        solo = SamplingParams(temperature=1.0, seed=41 + i, max_tokens=12, ignore_eos=True)
        assert output_ids(await collect(engine, GenerationRequest(f"solo-{i}", TASKS[1], prompt, solo))) == by_choice[i]
    assert len({tuple(tokens) for tokens in by_choice.values()}) == 3


async def test_closing_an_n_run_aborts_every_choice(engine: Engine) -> None:
    stream = engine.generate_choices(GenerationRequest("gone", None, PROMPT, greedy(400)), 3)
    seen: set[int] = set()
    async for index, _ in stream:
        seen.add(index)
        if len(seen) == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(100):
        if engine.stats().running == 0 and engine.stats().kv_blocks_used == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0


async def test_smollm2_json_schema_and_choice_output_validates(smollm2_dir: Path, tmp_path: Path) -> None:
    """The grammar works with a real 49k-token byte-level BPE vocabulary, not only the tiny one."""
    engine = make_engine(smollm2_dir, tmp_path, kv_cache_bytes=32 << 20)
    await engine.start()
    try:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Describe an invoice from ACME as JSON."}],
            add_generation_prompt=True,
            tokenize=True,
        )
        prompt = tuple(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        choice = GrammarSpec("choice", json.dumps(["positive", "negative"]), "guided_choice")
        requests = [
            GenerationRequest(
                f"s{seed}",
                None,
                prompt,
                SamplingParams(temperature=(0.0, 1.0)[seed % 2], seed=seed, max_tokens=120, grammar=SPEC),
            )
            for seed in range(4)
        ]
        requests.append(GenerationRequest("c", None, prompt, SamplingParams(max_tokens=8, grammar=choice)))
        runs = await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        await engine.stop(timeout=1.0)
    for chunks in runs[:4]:
        assert chunks[-1].finish_reason == "stop", _text(chunks)
        jsonschema.validate(json.loads(_text(chunks)), SCHEMA)
    assert _text(runs[4]) in ("positive", "negative")


async def test_logprobs_of_a_constrained_row_list_only_tokens_its_grammar_allows(engine: Engine) -> None:
    spec = GrammarSpec("choice", json.dumps(["yes"]), "guided_choice")
    chunks = await collect(
        engine, GenerationRequest("lp", None, PROMPT, SamplingParams(max_tokens=8, logprobs=5, grammar=spec))
    )
    entries = [lp for c in chunks for lp in c.logprobs or ()]
    assert _text(chunks) == "yes" and entries
    assert all(len(e.top) == 1 and e.top[0][2] == e.logprob == 0.0 for e in entries)


async def test_a_grammar_that_compiles_past_the_time_limit_is_invalid_request(tiny_model: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model, tmp_path, kv_cache_bytes=4 << 20, grammar_compile_timeout_s=0.02)
    await engine.start()
    properties = {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i % 9 + 1},{i % 9 + 40}}}"} for i in range(300)}
    slow = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": properties}))  # ~0.4 s here
    try:
        with pytest.raises(InvalidRequestError) as refused:
            await collect(engine, GenerationRequest("slow", None, PROMPT, SamplingParams(grammar=slow)))
        assert refused.value.param == "response_format" and "longer than" in str(refused.value)
        assert engine.core.grammars.cached() == 0
        chunks = await collect(engine, GenerationRequest("free", None, PROMPT, greedy(4)))
        assert len(output_ids(chunks)) == 4
    finally:
        await engine.stop(timeout=1.0)
