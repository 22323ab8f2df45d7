"""The shape the product code keeps: functions short enough to read whole (at most MAX_FUNCTION_LINES
lines, decorators excluded). Docstrings and annotations are kept by ruff (D100-D104) and strict mypy."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 45


def _long_functions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_is_longer_than_the_limit() -> None:
    sources = [p for package in ("server", "kernels", "compressor") for p in (ROOT / package).rglob("*.py")]
    assert len(sources) > 50, "the product's sources were not found"
    too_long = [row for path in sorted(sources) for row in _long_functions(path)]
    assert not too_long, "\n".join(too_long)


def test_the_limit_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "probe.py"
    path.write_text(f"def short() -> None:\n    pass\n\n\ndef long() -> None:\n{body}\n")
    assert _long_functions(path, tmp_path) == [f"probe.py:5 long has {MAX_FUNCTION_LINES + 1} lines"]
