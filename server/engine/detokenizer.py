"""Incremental detokenisation: complete UTF-8 characters only, with stop strings held back until decided.

Text is decoded from a short window of recent tokens (the offsets scheme of TGI / vLLM), so a
character split across tokens is emitted once whole, and each step costs O(window), not O(output).
Stop strings are matched by one Knuth-Morris-Pratt automaton each, fed only the new characters, and
only the text not yet emitted is kept: a step costs O(new characters x stop strings + held-back tail),
whatever the output's length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


def decode_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], skip_special_tokens: bool = False) -> str:
    """The text of a flat list of token ids."""
    # transformers types decode() as str | list[str]; a flat list of ids always decodes to one str
    return cast(str, tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))


class StopMatcher:
    """KMP automaton of one stop string; `matched` is the longest prefix of it that ends the text fed."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        self._fallback = _prefix_function(stop)

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the text fed now ends with the whole stop string."""
        n = self.matched
        while n and self.stop[n] != char:
            n = self._fallback[n - 1]
        if self.stop[n] == char:
            n += 1
        if n == len(self.stop):
            self.matched = self._fallback[n - 1]
            return True
        self.matched = n
        return False


def _prefix_function(pattern: str) -> list[int]:
    """pi[i]: length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    pi = [0] * len(pattern)
    for i in range(1, len(pattern)):
        n = pi[i - 1]
        while n and pattern[i] != pattern[n]:
            n = pi[n - 1]
        pi[i] = n + 1 if pattern[i] == pattern[n] else n
    return pi


class IncrementalDetokenizer:
    """One sequence's output as text: whole characters only, stop strings cut and withheld until decided."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-4:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stops = [StopMatcher(s) for s in stop if s]
        self._pending = ""
        """Decoded text not emitted yet: this step's, or a tail that may begin a stop string."""
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped` when the text now contains a stop string."""
        self._ids.append(token_id)
        piece = self._next_piece()
        start = len(self._pending)
        self._pending += piece
        if self._stops and not self.stopped:
            self._match(start, piece)

    def _match(self, start: int, piece: str) -> None:
        """Feed the new characters to every stop automaton; cut the text before the first stop completed
        (the longest of those completed by the same character)."""
        for offset, char in enumerate(piece):
            completed = [len(matcher.stop) for matcher in self._stops if matcher.feed(char)]
            if completed:
                self._pending = self._pending[: start + offset + 1 - max(completed)]
                self.stopped = True
                return

    def _next_piece(self) -> str:
        prefix = decode_text(self._tok, self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode_text(self._tok, self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def flush(self, final: bool) -> str:
        """New text safe to show: on a non-final step, any tail that may begin a stop string is withheld."""
        end = len(self._pending) if final or self.stopped else len(self._pending) - self._held_back()
        piece, self._pending = self._pending[:end], self._pending[end:]
        return piece

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string (it is
        never emitted, so it lies within the pending text)."""
        return max((matcher.matched for matcher in self._stops), default=0)
