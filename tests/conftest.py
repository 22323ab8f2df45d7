"""Fixtures shared by every test package: tiny models made in the test, the shipped SmolLM2, real Redis."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and other tests (transformers' generate, for
# one) may import it before the kernel tests run: set it for the whole session on a machine without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server.model.provision import pull_smollm2
from server.model.synthetic import write_tiny

REDIS_URL = os.environ.get("DELTASERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (untied LM head, GQA) from seed 0."""
    return write_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the LM head tied to the embedding."""
    return write_tiny(tmp_path_factory.mktemp("models") / "tiny-tied", seed=1, tied=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct provisioned in the model cache (reused across runs; verified by checksum)."""
    cache = Path(os.environ.get("DELTASERVE_MODEL_CACHE", "~/.cache/deltaserve/models")).expanduser()
    return pull_smollm2(cache)


@pytest.fixture()
def redis_url() -> str:
    """A real Redis database, emptied before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis answers at {REDIS_URL}; run `make redis` (scripts/ensure-redis.sh)")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
