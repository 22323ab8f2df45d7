"""FastAPI dependencies that turn `Authorization: Bearer` into a Principal (401 / 403 otherwise)."""

from __future__ import annotations

from fastapi import Request

from server.api.context import context_of
from server.api.errors import forbidden, unauthorized
from server.auth import Principal


def api_principal(request: Request) -> Principal:
    """Any configured key (admin keys reach every task)."""
    principal = context_of(request).keys.authenticate(request.headers.get("authorization"))
    if principal is None:
        raise unauthorized()
    return principal


def admin_principal(request: Request) -> Principal:
    """An admin key's principal (403 for any other key)."""
    principal = api_principal(request)
    if not principal.admin:
        raise forbidden("The admin API needs an admin key.")
    return principal
