"""A bounded fuzz of the HTTP surface (bench/fuzz_http.py) against the real app and engine on the tiny
base, over real TCP: no 5xx, every error in OpenAI's shape, every stream finished, no connection reset.
DELTASERVE_FUZZ_REQUESTS sets the number of requests (bench/fuzz_http.py runs 20k outside the suite)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_app import ADMIN_KEY, API_KEY, keyed_app, serving

from bench.fuzz_http import Target, fuzz, publish_task

REQUESTS = int(os.environ.get("DELTASERVE_FUZZ_REQUESTS", "3000"))


@pytest.fixture(scope="module")
def fuzz_target(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with serving(keyed_app(tiny_model, tmp)) as url:
        publish_task(url, tiny_model, tmp / "artifacts", ADMIN_KEY)
        yield Target(url, "tiny", ADMIN_KEY, API_KEY)


def test_fuzzed_requests_get_no_5xx_no_reset_and_openai_shaped_errors(fuzz_target: Target) -> None:
    tally = fuzz(fuzz_target, REQUESTS, fuzz_seed=0)
    report = json.dumps(tally.failures, indent=1)
    assert tally.requests == REQUESTS
    assert tally.server_errors == 0, report
    assert tally.resets == 0 and tally.closed == 0, report
    assert tally.bad_shape == 0 and tally.unfinished_streams == 0, report
    assert tally.statuses.get("200", 0) > REQUESTS // 20, tally.statuses  # the fuzz reaches the engine too
