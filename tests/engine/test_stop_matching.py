"""Stop strings in the incremental detokenizer: each matched by a KMP automaton fed only new characters,
checked against the plain definition (first stop string to end in the text; longest held-back tail)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.engine.detokenizer import IncrementalDetokenizer, StopMatcher


class CharTokenizer:
    """Token id i is the character chr(i)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the text is cut: the start of the stop string that is complete earliest (longest on ties)."""
    for end in range(1, len(text) + 1):
        found = [s for s in stops if s and text[:end].endswith(s)]
        if found:
            return end - max(len(s) for s in found)
    return None


def _held_back(text: str, stops: list[str]) -> int:
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


ALPHABET = st.text(alphabet="abc", max_size=40)


@settings(max_examples=300, deadline=None)
@example("xab", ["b", "ab"])
@given(ALPHABET, st.lists(st.text(alphabet="abc", min_size=1, max_size=6), max_size=4))
def test_the_text_is_cut_before_the_first_stop_string_and_prefixes_are_held_back(text: str, stops: list[str]) -> None:
    detok = IncrementalDetokenizer(CharTokenizer(), [], tuple(stops))
    shown = ""
    for char in text:
        detok.add(ord(char))
        shown += detok.flush(final=False)
        if detok.stopped:
            break
    cut = _first_stop(text, stops)
    if cut is None:
        assert not detok.stopped and shown == text[: len(text) - _held_back(text, stops)]
        assert shown + detok.flush(final=True) == text
    else:
        assert detok.stopped and shown + detok.flush(final=True) == text[:cut]


def test_a_matcher_follows_overlapping_prefixes() -> None:
    matcher = StopMatcher("abab")
    fed = [matcher.feed(c) for c in "ababab"]
    assert fed == [False, False, False, True, False, True]
    matcher = StopMatcher("aab")
    assert [matcher.feed(c) for c in "aaab"] == [False, False, False, True]
