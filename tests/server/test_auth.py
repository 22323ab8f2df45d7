"""Keys: hashed storage, bearer parsing, admin vs task-scoped API keys, open mode."""

from __future__ import annotations

import hashlib

from server.auth import OPEN, KeyRing
from server.config import load_settings


def test_no_keys_means_open_mode_admitting_everyone() -> None:
    ring = KeyRing([], {})
    assert ring.open and ring.authenticate(None) is OPEN


def test_admin_key_is_admin_and_reaches_every_task() -> None:
    ring = KeyRing(["root-secret"], {"user-secret": ["a"]})
    admin = ring.authenticate("Bearer root-secret")
    assert admin is not None and admin.admin and admin.may_use("anything")


def test_api_key_reaches_only_its_tasks_and_the_base() -> None:
    ring = KeyRing(["root-secret"], {"user-secret": ["a", "b"]})
    user = ring.authenticate("Bearer user-secret")
    assert user is not None and not user.admin
    assert user.may_use("a") and user.may_use("b") and user.may_use(None)
    assert not user.may_use("c")


def test_star_scope_allows_every_task() -> None:
    user = KeyRing([], {"k": ["*"]}).authenticate("Bearer k")
    assert user is not None and user.may_use("whatever") and not user.admin


def test_missing_wrong_or_malformed_credentials_are_refused() -> None:
    ring = KeyRing(["root-secret"], {})
    for header in (None, "", "Bearer", "Bearer wrong", "Basic root-secret", "root-secret"):
        assert ring.authenticate(header) is None, header


def test_keys_given_as_sha256_digests_authenticate_the_plain_key() -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    ring = KeyRing([f"sha256:{digest}"], {})
    assert ring.authenticate("Bearer s3cret") is not None
    assert ring.authenticate(f"Bearer sha256:{digest}") is None


def test_plain_keys_are_not_kept_and_labels_do_not_reveal_them() -> None:
    ring = KeyRing(["root-secret"], {"user-secret": ["a"]})
    held = repr(ring._keys)
    assert "root-secret" not in held and "user-secret" not in held
    assert ring.authenticate("Bearer root-secret").name.startswith("admin-")


def test_keys_come_from_settings() -> None:
    settings = load_settings(admin_keys="one, two", api_keys={"three": ["t"]})
    ring = KeyRing.from_settings(settings)
    assert ring.authenticate("Bearer two").admin
    assert ring.authenticate("Bearer three").tasks == frozenset({"t"})


def test_without_keys_the_server_binds_to_loopback_only(caplog: object) -> None:
    from server.app import _safe_host

    assert _safe_host("0.0.0.0", KeyRing([], {})) == "127.0.0.1"
    assert _safe_host("::1", KeyRing([], {})) == "::1"
    assert _safe_host("0.0.0.0", KeyRing(["adm"], {})) == "0.0.0.0"
    assert "binding to 127.0.0.1" in caplog.text
