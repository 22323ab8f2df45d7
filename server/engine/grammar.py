"""Grammar-constrained decoding with xgrammar: compiled grammars cached per spec, a matcher per sequence.

One `Grammars` serves one tokenizer (the base's), so its cache is keyed per (tokenizer, grammar). A
spec is compiled once, in a small worker pool and under a time limit, then kept in a bounded LRU;
each constrained sequence gets its own `GrammarMatcher` (its parse state). Every step the sampler
asks each constrained row's matcher for its token bitmask and masks only that row's logits, so one
row's grammar never touches another row. When the grammar is complete the mask allows only the stop
tokens; accepting one terminates the matcher and the sequence finishes with `stop`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr

from server.engine.types import GrammarSpec, InvalidRequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("deltaserve.engine")
COMPILE_WORKERS = 2
"""Threads that compile grammars; a compile past its time limit keeps one busy until it ends."""


COUNTED_CHAR = r"[^\"\\\r\n]"
"""xgrammar's character class for strings with minLength / maxLength: it admits raw control characters
(U+0000-U+001F other than CR and LF), which JSON forbids inside strings, so such output would not parse."""
JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
r"""What an unescaped JSON string character may be (RFC 8259): anything but controls, `"` and `\`."""


class Grammars:
    """The compiled grammars of one tokenizer (a bounded LRU, compiled in a worker pool under a time limit)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        cache_size: int,
        compile_timeout_s: float,
    ) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="grammar")
        self.cache_size = cache_size
        self.compile_timeout_s = compile_timeout_s

    async def compiled(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The spec's compiled grammar (cached); InvalidRequestError naming `spec.param` when it cannot be
        compiled or its compilation takes longer than the time limit."""
        key = (spec.kind, spec.source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        future = asyncio.wrap_future(self._pool.submit(self._compile, spec))
        try:
            grammar = await asyncio.wait_for(future, self.compile_timeout_s)
        except TimeoutError:
            raise InvalidRequestError(
                f"the grammar of `{spec.param}` took longer than {self.compile_timeout_s} s to compile", spec.param
            ) from None
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind in ("json_object", "json_schema"):
                return self._compiler.compile_grammar(json_grammar(spec))
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.source)
            return self._compiler.compile_grammar(choice_grammar(json.loads(spec.source)))
        except Exception as exc:  # noqa: BLE001 - xgrammar's compile errors have no common type
            raise InvalidRequestError(
                f"`{spec.param}` cannot be compiled into a grammar: {_reason(exc)}", spec.param
            ) from None

    def matcher(self, grammar: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        """A fresh parse state of `grammar` for one sequence."""
        return xgr.GrammarMatcher(grammar)

    def cached(self) -> int:
        """How many compiled grammars the cache holds."""
        with self._lock:
            return len(self._cache)

    def close(self) -> None:
        """Stop the compiler threads (a compile in progress is abandoned)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def json_grammar(spec: GrammarSpec) -> str:
    """EBNF of compact JSON (no free whitespace) matching the spec's schema, or any JSON object."""
    if spec.kind == "json_object":
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    else:
        grammar = xgr.Grammar.from_json_schema(spec.source, any_whitespace=False, strict_mode=True)
    return str(grammar).replace(COUNTED_CHAR, JSON_STRING_CHAR)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose only sentences are the given strings (JSON string literals are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


def _reason(exc: Exception) -> str:
    """xgrammar's message without its source location prefix (`[time] file.cc:line: `)."""
    text = str(exc).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def mask_rows(logits: torch.Tensor, matchers: dict[int, xgr.GrammarMatcher]) -> set[int]:
    """logits: [R, vocab], in place: each row i in `matchers` keeps only the tokens its grammar allows next.
    Returns the rows whose matcher failed (their logits untouched; the caller fails those rows alone)."""
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # [R, ceil(vocab / 32)] int32
    failed: set[int] = set()
    for i, matcher in matchers.items():
        try:
            matcher.fill_next_token_bitmask(bitmask, i)
        except Exception:
            log.exception("the grammar matcher of one row failed; only its request ends")
            failed.add(i)
    rows = sorted(set(matchers) - failed)
    if rows:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
    return failed
