"""Keys: admin keys for /admin, API keys scoped to sets of tasks; `Authorization: Bearer <key>`.

Keys are kept only as sha256 digests (settings may give them already hashed as `sha256:<hex>`), every
presented key is compared against every stored digest with `hmac.compare_digest`, and neither a key
nor its digest is ever logged: a principal is named by a short prefix of its digest's digest.
With no key configured at all the server is open and binds to localhost only (see `run_server`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from server.config import Settings

ALL_TASKS = "*"


@dataclass(frozen=True)
class Principal:
    """Who is calling, as far as the server cares."""

    name: str
    """A log-safe label (`open`, `admin-<id>`, `key-<id>`), never the key."""
    admin: bool
    tasks: frozenset[str] | None
    """Tasks this principal may use; None means every task. The base model is open to every principal."""

    def may_use(self, task: str | None) -> bool:
        """Whether this principal may run `task` (None: the base, open to all)."""
        return task is None or self.tasks is None or task in self.tasks


OPEN = Principal(name="open", admin=True, tasks=None)


@dataclass(frozen=True)
class _StoredKey:
    digest: bytes
    principal: Principal


class KeyRing:
    """The configured keys, as digests: authenticates a bearer key into its Principal."""

    def __init__(self, admin_keys: list[str], api_keys: dict[str, list[str]]) -> None:
        stored = [_stored(key, admin=True, tasks=None) for key in admin_keys]
        stored += [_stored(key, admin=False, tasks=_scope(tasks)) for key, tasks in api_keys.items()]
        self._keys = tuple(stored)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of DELTASERVE_ADMIN_KEYS and DELTASERVE_API_KEYS."""
        admin = [key.strip() for key in settings.admin_keys.split(",") if key.strip()]
        return cls(admin, dict(settings.api_keys))

    @property
    def open(self) -> bool:
        """No keys configured: every caller is admitted (the server then binds to localhost only)."""
        return not self._keys

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of an `Authorization: Bearer <key>` header; None when missing or unknown."""
        if self.open:
            return OPEN
        presented = _bearer(authorization)
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.principal
        return found


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _stored(key: str, *, admin: bool, tasks: frozenset[str] | None) -> _StoredKey:
    digest = _digest(key)
    label = hashlib.sha256(digest).hexdigest()[:8]
    return _StoredKey(digest, Principal(f"{'admin' if admin else 'key'}-{label}", admin, tasks))


def _digest(key: str) -> bytes:
    if key.startswith("sha256:"):
        hexed = key.removeprefix("sha256:")
        if len(hexed) != 64:
            raise ValueError("a hashed key must be `sha256:` followed by 64 hex digits")
        return bytes.fromhex(hexed)
    return hashlib.sha256(key.encode()).digest()


def _scope(tasks: list[str]) -> frozenset[str] | None:
    return None if ALL_TASKS in tasks else frozenset(tasks)
