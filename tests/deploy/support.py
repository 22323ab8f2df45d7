"""Shared paths and helpers of the deploy checks (imported by the tests; no fixtures). All offline."""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

from server.config import ENV_PREFIX, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GATEWAY = DEPLOY / "gateway"
VENV_BIN = Path(sys.executable).parent
GATEWAY_VAR = re.compile(r"\$\{(GATEWAY_[A-Z_]+)\}")

SECRET_SETTINGS = {"DELTASERVE_ADMIN_KEYS", "DELTASERVE_API_KEYS"}
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def tool(name: str) -> Path:
    """A command-line tool installed into this virtualenv by the dev extra; fails the test when absent."""
    path = VENV_BIN / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: install the dev extra (pip install -e '.[dev]')")
    return path


def known_setting(env_name: str) -> bool:
    """True when `env_name` is a DELTASERVE_ variable that Settings reads (contract E)."""
    if not env_name.startswith(ENV_PREFIX):
        return False
    field = env_name[len(ENV_PREFIX) :].lower()
    return field in Settings.model_fields


def render_gateway_template(text: str, values: dict[str, str]) -> str:
    """envsubst as the nginx image runs it (filter GATEWAY_): only ${GATEWAY_*} names are replaced."""
    return GATEWAY_VAR.sub(lambda m: values[m.group(1)], text)


SAMPLE_KEYS = {"DELTASERVE_ADMIN_KEYS": "admin-key", "DELTASERVE_API_KEYS": '{"client-key": ["*"]}'}


def parse_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the server would read from exactly `env` (plus sample keys); raises on a bad value."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in {**env, **SAMPLE_KEYS}.items():
        monkeypatch.setenv(name, value)
    return load_settings()
