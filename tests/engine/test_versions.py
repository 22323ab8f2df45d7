"""The engine serves exactly the version a request resolved: a new version of a task is served with no
invalidation at all, and a request carrying a version names the delta it runs with."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from server.engine.types import GenerationRequest, InvalidRequestError
from tests.engine.conftest import collect, greedy, make_engine, output_ids

PROMPT = (5, 17, 40, 99, 3)


async def test_a_new_version_is_served_without_any_invalidation(
    tiny_model: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    shutil.copyfile(tiny_tasks / "alpha.safetensors", tmp_path / "t.safetensors")
    shutil.copyfile(tiny_tasks / "beta.safetensors", tmp_path / "beta.safetensors")
    engine = make_engine(tiny_model, tmp_path)
    await engine.start()
    try:
        v1 = output_ids(await collect(engine, GenerationRequest("a", "t", PROMPT, greedy(8))))
        assert engine.stats().resident_tasks == ("t",)
        shutil.copyfile(tiny_tasks / "beta.safetensors", tmp_path / "t.safetensors")  # no invalidate()
        v2 = output_ids(await collect(engine, GenerationRequest("b", "t", PROMPT, greedy(8))))
        beta = output_ids(await collect(engine, GenerationRequest("c", "beta", PROMPT, greedy(8))))
        assert v1 != v2 == beta
        stats = engine.stats()
        assert stats.delta_loads == 3 and stats.delta_misses == 3
        assert engine.core.deltas.resident_version("t") == engine.source.lookup("t").sha256
        ref = engine.source.lookup("t")
        with pytest.raises(InvalidRequestError):
            await collect(engine, GenerationRequest("d", "beta", PROMPT, greedy(2), ref))
        carried = output_ids(await collect(engine, GenerationRequest("e", "t", PROMPT, greedy(8), replace(ref))))
        assert carried == v2 and engine.stats().delta_hits == 1
    finally:
        await engine.stop(timeout=0.1)
