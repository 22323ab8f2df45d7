"""Greedy answers through the serving engine: the base resident, the task's artifact as a resident
delta, all prompts submitted at once so the engine batches them. The harness's merged-weights
answers are the reference this path must agree with: serving a delta beside the base must answer as
the merged weights W_base + delta do.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from bench.testbed.encoding import END_OF_TURN, prompt_text
from bench.testbed.evaluate import until_end
from bench.testbed.tasks import Task
from server.config import load_settings
from server.engine.engine import Engine
from server.engine.sources import LocalDirDeltaSource
from server.engine.types import GenerationRequest, SamplingParams


def engine_token_ids(base_dir: Path, artifact: Path | None, task: Task, prompts: list[str]) -> list[list[int]]:
    """The engine's greedy answer tokens to each prompt, up to the end of turn (exclusive); the base
    alone when `artifact` is None."""
    with tempfile.TemporaryDirectory(prefix="testbed-engine-") as folder:
        if artifact is not None:
            shutil.copy(artifact, Path(folder) / f"{task.name}.safetensors")
        engine = Engine(load_settings(base_model=str(base_dir)), LocalDirDeltaSource(Path(folder)))
        return asyncio.run(_answers(engine, task, prompts, task.name if artifact is not None else None))


async def _answers(engine: Engine, task: Task, prompts: list[str], task_name: str | None) -> list[list[int]]:
    await engine.start()
    try:
        end = engine.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        params = SamplingParams(temperature=0.0, max_tokens=task.max_new_tokens, stop_token_ids=(end,))
        requests = [
            GenerationRequest(f"testbed-{i}", task_name, tuple(_prompt_ids(engine, task, p)), params)
            for i, p in enumerate(prompts)
        ]
        outputs = await asyncio.gather(*(_token_ids(engine, request) for request in requests))
        return [until_end(tokens, end) for tokens in outputs]
    finally:
        await engine.stop(timeout=1.0)


def _prompt_ids(engine: Engine, task: Task, prompt: str) -> list[int]:
    return engine.tokenizer(prompt_text(engine.tokenizer, task, prompt), add_special_tokens=False).input_ids


async def _token_ids(engine: Engine, request: GenerationRequest) -> list[int]:
    return [token for chunk in [c async for c in engine.generate(request)] for token in chunk.token_ids]
