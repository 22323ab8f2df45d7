"""The direction of imports: each package imports only the layers below it (docs/architecture.md).

kernels/ imports nothing of ours; compressor/ only kernels; server/ never bench or tests. Inside server/:
api -> engine -> model, engine -> registry, jobs -> registry; nothing imports api but the app that mounts it
and the CLI that runs it. Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("kernels", "compressor", "server", "bench", "tests")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "kernels": ("compressor", "server", "bench", "tests"),
    "compressor": ("server", "bench", "tests"),
    "server": ("bench", "tests"),
    "server.registry": ("server.engine", "server.api", "server.jobs", "server.model", "server.app", "server.cli"),
    "server.jobs": ("server.engine", "server.api", "server.app", "server.cli"),
    "server.model": ("server.engine", "server.api", "server.registry", "server.jobs", "server.app", "server.cli"),
    "server.engine": ("server.api", "server.jobs", "server.app", "server.cli"),
    "server.api": ("server.app", "server.cli"),
    "server.files": ("server.engine", "server.api", "server.registry", "server.jobs", "server.model"),
}
"""Module prefix -> module prefixes it must not import."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; ours are all absolute)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _sources() -> list[Path]:
    return sorted(p for package in ("kernels", "compressor", "server") for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    module = _module_name(path)
    rules = [(prefix, banned) for prefix, banned in FORBIDDEN.items() if _under(module, prefix)]
    wrong = sorted(
        f"{module} imports {name} (no {prefix} module may import {ban})"
        for name in _imports(path)
        if name.split(".")[0] in OURS
        for prefix, banned in rules
        for ban in banned
        if _under(name, ban)
    )
    assert not wrong, "\n".join(wrong)


def test_the_rules_see_every_package() -> None:
    """A rule names only packages and modules that exist, so a rename cannot silently disable it."""
    names = {_module_name(p) for p in _sources()}
    for prefix in FORBIDDEN:
        assert any(_under(name, prefix) for name in names), f"no module under {prefix}"
