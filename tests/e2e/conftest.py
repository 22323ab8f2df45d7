"""Fixtures of the e2e tests (helpers in live.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from live import shard

from server.model.synthetic import write_synthetic_finetune


@pytest.fixture(scope="session")
def finetunes(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two fine-tunes of the tiny base (one saved sharded) whose greedy outputs differ from the base's."""
    root = tmp_path_factory.mktemp("finetunes")
    return {
        "math": write_synthetic_finetune(tiny_model, root / "math", seed=1, scale=0.6),
        "code": shard(write_synthetic_finetune(tiny_model, root / "code-single", seed=2, scale=0.6), root / "code"),
    }


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)
