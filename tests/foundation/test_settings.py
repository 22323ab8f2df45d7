"""Settings: read from DELTASERVE_* variables, clear errors naming the variable, README table in step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import SettingsError, load_settings, readme_with_settings, settings_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_settings_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTASERVE_PORT", "9123")
    monkeypatch.setenv("DELTASERVE_REGISTRY", "redis")
    monkeypatch.setenv("DELTASERVE_BASE_MODEL", "/models/x")
    settings = load_settings()
    assert (settings.port, settings.registry, settings.base_model) == (9123, "redis", "/models/x")


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1")
    assert load_settings().port == 8000


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DELTASERVE_PORT", "not-a-port"),
        ("DELTASERVE_PORT", "70000"),
        ("DELTASERVE_REGISTRY", "mongo"),
        ("DELTASERVE_API_KEYS", "{not json"),
        ("DELTASERVE_DEFAULT_METHOD", "bogus"),
        ("DELTASERVE_DEFAULT_METHOD", "full"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_the_default_method_is_one_of_the_compressors_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    import compressor

    assert load_settings().default_method in compressor.METHODS
    for method in compressor.METHODS:
        monkeypatch.setenv("DELTASERVE_DEFAULT_METHOD", method)
        assert load_settings().default_method == method


def test_empty_variables_mean_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTASERVE_PORT", "")
    monkeypatch.setenv("DELTASERVE_API_KEYS", "")
    settings = load_settings()
    assert (settings.port, settings.api_keys) == (8000, {})


def test_cli_reports_bad_setting_without_traceback() -> None:
    env = {"DELTASERVE_DTYPE": "int3", "PATH": ""}
    proc = subprocess.run([sys.executable, "-m", "server.cli", "settings"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "DELTASERVE_DTYPE" in proc.stderr and "Traceback" not in proc.stderr


def test_every_setting_has_a_docstring() -> None:
    from server.config import Settings

    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undocumented == []


def test_readme_settings_table_matches_the_class() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_with_settings(readme) == readme, "README settings table is stale: run `make settings-table`"
    assert settings_markdown() in readme
