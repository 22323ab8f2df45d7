"""The one reader of the environment: every setting of deltaserve, prefix `DELTASERVE_`.

Each field's docstring is its one-line documentation; `deltaserve settings --markdown` renders them
into the README's table, and a test keeps the two in step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "DELTASERVE_"


class SettingsError(ValueError):
    """A setting read from the environment has a bad value; the message names the variable."""


class Settings(BaseSettings):
    """Every setting of deltaserve, read from DELTASERVE_* variables (frozen)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        use_attribute_docstrings=True,
        env_ignore_empty=True,  # DELTASERVE_X= (empty) means the default, as in compose/k8s env files
    )

    host: str = "127.0.0.1"
    """Address the HTTP server binds to."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port the HTTP server listens on."""
    base_model: str = "smollm2"
    """Base model: a provisioned name (`smollm2`, `tiny`) or the path of an HF-layout folder."""
    model_cache: Path = Path("~/.cache/deltaserve/models")
    """Folder where `deltaserve models` writes provisioned base models."""
    device: str = "cpu"
    """Torch device the engine runs on (`cpu`, `cuda`, `cuda:1`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the resident base weights and activations."""
    registry: Literal["local", "redis"] = "local"
    """Registry backend for tasks and artifacts: `local` (a folder) or `redis`."""
    registry_dir: Path = Path("~/.cache/deltaserve/registry")
    """Folder of the local registry (index and blobs)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL of the shared registry when `registry` is `redis`."""
    registry_timeout: float = Field(1.0, gt=0.0)
    """Seconds one Redis registry call may wait (connect, each read) before the registry counts as unreachable."""
    registry_resync_s: float = Field(0.5, gt=0.0)
    """Seconds between full re-reads of the registry index (repairs missed change events; bounds staleness)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server."""
    delta_cache_bytes: int = Field(1 << 30, ge=1)
    """Byte budget of resident task deltas in the engine (LRU beyond it; deltas in use are never evicted)."""
    kv_cache_bytes: int = Field(512 << 20, ge=1)
    """Byte budget of the engine's paged KV cache (sets how many tokens all running requests can hold)."""
    max_batch_tokens: int = Field(512, ge=1)
    """Most tokens (prefill chunks plus decodes) the engine runs in one step."""
    max_running: int = Field(64, ge=1)
    """Most requests the engine decodes at once; the rest wait in the queue."""
    max_queue: int = Field(1024, ge=1)
    """Most requests waiting for admission; beyond it new requests get HTTP 429."""
    kv_block_size: int = Field(16, ge=1)
    """Tokens per block of the paged KV cache."""
    prefix_cache: bool = True
    """Automatic prefix caching (`false`: off): full KV blocks of a task version or the base serve later requests."""
    torch_threads: int = Field(0, ge=0)
    """CPU threads of the engine's torch ops (0: torch's default, one per core); 1 is faster on a busy shared CPU."""
    admin_keys: str = ""
    """Admin keys for /admin, comma-separated; each a plain key or `sha256:<hex digest of the key>`."""
    api_keys: dict[str, list[str]] = {}
    """API keys as JSON `{"<key or sha256:hex>": ["task", ...]}`; `"*"` in the list allows every task."""
    max_upload_bytes: int = Field(8 * 1024**3, ge=1)
    """Largest accepted upload (checkpoint or artifact) in bytes; larger bodies get HTTP 413."""
    max_request_bytes: int = Field(16 * 1024**2, ge=1)
    """Largest accepted body of an OpenAI API request in bytes; larger bodies get HTTP 413."""
    max_stop_strings: int = Field(16, ge=0)
    """Most stop strings one request may give (`stop`); more get HTTP 400 naming `stop`."""
    max_stop_chars: int = Field(256, ge=1)
    """Most characters of one stop string; longer ones get HTTP 400 naming `stop`."""
    max_stop_token_ids: int = Field(64, ge=0)
    """Most stop token ids one request may give (`stop_token_ids`); more get HTTP 400."""
    max_prompt_chars: int = Field(1 << 18, ge=1)
    """Most characters of a prompt (completions) or of all messages' text (chat), checked before tokenizing."""
    max_messages: int = Field(2048, ge=1)
    """Most messages in one chat request; more get HTTP 400 naming `messages`."""
    max_n: int = Field(16, ge=1)
    """Most choices one request may ask for (`n`); more get HTTP 400 naming `n`."""
    max_logit_bias: int = Field(300, ge=0)
    """Most entries of one request's `logit_bias`; more get HTTP 400 naming `logit_bias`."""
    max_grammar_chars: int = Field(1 << 16, ge=1)
    """Most characters of a request's grammar (its JSON schema as JSON, `guided_regex`, `guided_choice` as JSON)."""
    grammar_compile_timeout_s: float = Field(10.0, gt=0.0)
    """Seconds a request's grammar may take to compile; longer is HTTP 400 naming its field."""
    grammar_cache_size: int = Field(256, ge=1)
    """Compiled grammars kept (LRU) so that requests with the same schema skip compilation."""
    metrics_access: Literal["auto", "open", "admin"] = "auto"
    """Who may read /metrics: `open` (anyone), `admin` (an admin key), `auto` (admin when any key is configured)."""
    default_method: str = "impart"
    """Compression method of an uploaded checkpoint when the upload names none."""
    default_ratio: float = Field(32.0, gt=1.0)
    """Compression ratio of an uploaded checkpoint when the upload names none."""
    shutdown_timeout: float = Field(30.0, ge=0.0)
    """Seconds in-flight requests get to finish at shutdown before they are aborted."""
    work_dir: Path = Path("~/.cache/deltaserve/work")
    """Folder for uploads in progress and compression jobs' scratch files."""

    @field_validator("default_method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from compressor import METHODS  # here, not at the top: compressor loads torch, few settings readers need it

        return check_method(method, METHODS)

    def resolved(self, path: Path) -> Path:
        """`path` with `~` expanded, absolute."""
        return path.expanduser().resolve()


def check_method(method: str, methods: Sequence[str]) -> str:
    """`method` when it is one of `methods` (a compressor list: METHODS, ADAPTER_METHODS); else a
    ValueError listing them (pydantic turns it into the error naming the setting or the field)."""
    if method not in methods:
        raise ValueError(f"unknown compression method {method!r}; use one of {', '.join(methods)}")
    return method


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment; a bad value raises SettingsError naming its variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except SourceError as exc:  # a value that is not even parseable (e.g. bad JSON for a dict field)
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else "a DELTASERVE_ variable"
        raise SettingsError(f"invalid settings: {name}: cannot parse the value ({exc.__cause__ or exc})") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        lines.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']} (got {err.get('input')!r})")
    return "invalid settings: " + "; ".join(lines)


def settings_markdown() -> str:
    """The README's settings table, rendered from the field docstrings."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = str(default) if default not in (None, "") else ""
        doc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{shown}` | {doc} |")
    return "\n".join(rows)


README_START = "<!-- settings:start -->"
README_END = "<!-- settings:end -->"


def readme_with_settings(readme: str) -> str:
    """`readme` with the text between the settings markers replaced by the current table."""
    head, sep, rest = readme.partition(README_START)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise ValueError(f"README lacks the {README_START} / {README_END} markers")
    return f"{head}{README_START}\n{settings_markdown()}\n{README_END}{tail}"
