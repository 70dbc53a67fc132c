"""API keys: ``Authorization: Bearer KEY``, compared in constant time (``hmac.compare_digest``).

Two sets of keys: inference keys (``--api-key`` / ``SMOA_API_KEY``) and admin keys (``--admin-key`` /
``SMOA_ADMIN_KEY``, also valid for inference). With no key configured at all the server is open (local use).
With inference keys but no admin key, the management endpoints are refused to everyone (403).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from smoa.serve.errors import AuthenticationError, PermissionDeniedError

__all__ = ["authorize", "bearer_token", "key_matches"]


def key_matches(provided: str, keys: Sequence[str]) -> bool:
    """Whether ``provided`` is one of ``keys``; every key is compared (no early exit), each in constant time."""
    given = provided.encode("utf-8", "surrogatepass")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode("utf-8", "surrogatepass"))
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (``None`` if absent or another scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorize(
    authorization: str | None, api_keys: Sequence[str], admin_keys: Sequence[str], *, admin: bool
) -> str:
    """Check a request's key; returns the client identity (a short hash of its key, or ``"anonymous"``).

    Raises:
        AuthenticationError: keys are required and none / a wrong one was given (401).
        PermissionDeniedError: an inference key on an admin endpoint, or no admin key configured (403).
    """
    if not api_keys and not admin_keys:
        return "anonymous"
    token = bearer_token(authorization)
    if token is None:
        raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
    is_admin = key_matches(token, admin_keys)
    is_user = key_matches(token, api_keys)
    if not (is_admin or is_user):
        raise AuthenticationError("invalid API key", code="invalid_api_key")
    if admin and not is_admin:
        raise PermissionDeniedError("this endpoint needs an admin key (`--admin-key` / SMOA_ADMIN_KEY)",
                                    code="admin_key_required")  # fmt: skip
    return "key-" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]
