"""Fixtures of the compressor tests: a tiny base and a fine-tune made by perturbing it in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_finetunes import perturb

from server.model.synthetic import write_tiny


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base, fine-tune): tiny untied Llama and a perturbed copy."""
    root = tmp_path_factory.mktemp("pair")
    base = write_tiny(root / "base", seed=0)
    return base, perturb(base, root / "ft")


@pytest.fixture(scope="session")
def tied_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tied")
    base = write_tiny(root / "base", seed=1, tied=True)
    return base, perturb(base, root / "ft", seed=2)


@pytest.fixture(autouse=True)
def one_torch_thread() -> object:
    """This machine's two cores are shared: small SVDs run ~80x slower with OpenMP threads spinning
    against other processes, so the compressor tests run single-threaded (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
