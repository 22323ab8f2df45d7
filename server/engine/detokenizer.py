"""Incremental detokenisation: complete UTF-8 characters only, with stop strings held back until decided.

Text is decoded from a short window of recent tokens (the offsets scheme of TGI / vLLM), so a
character split across tokens is emitted once whole, and each step costs O(window), not O(output).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-4:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self.text = ""
        """All text decoded so far (stop string excluded once found)."""
        self._emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped` when the text now contains a stop string."""
        self._ids.append(token_id)
        self.text += self._next_piece()
        for stop in self._stop:
            at = self.text.find(stop, max(0, self._emitted - len(stop)))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True

    def _next_piece(self) -> str:
        decode = self._tok.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def flush(self, final: bool) -> str:
        """New text safe to show: on a non-final step, any tail that may begin a stop string is withheld."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
