"""API keys and scopes: ``Authorization: Bearer <key>``; ``admin`` may do everything, ``infer`` reads and infers.

Keys are compared as SHA-256 digests with :func:`hmac.compare_digest`, against every configured
key without stopping at the first match, so the time taken says nothing about how close a guess
was or which list it matched. With no key configured, authentication is off (the server then
refuses to bind anywhere but loopback: see ``service.cli``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Literal

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.errors import Forbidden, Unauthorized

Scope = Literal["admin", "infer"]

#: Declares the ``bearer`` security scheme in the OpenAPI schema (so clients and fuzzers know a key is
#: needed); ``auto_error=False`` because :meth:`KeyRing.check` decides, from the raw header, what to refuse.
_BEARER = HTTPBearer(scheme_name="bearer", auto_error=False, description="an API key: Authorization: Bearer <key>")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured keys, as digests, by scope."""

    def __init__(self, admin: Sequence[SecretStr], infer: Sequence[SecretStr]) -> None:
        self._admin = [_digest(k.get_secret_value()) for k in admin]
        self._infer = [_digest(k.get_secret_value()) for k in infer]

    @property
    def enabled(self) -> bool:
        return bool(self._admin or self._infer)

    def scopes(self, presented: str) -> set[Scope]:
        """The scopes a presented key grants (empty for an unknown key)."""
        digest = _digest(presented)
        is_admin = False
        is_infer = False
        for known in self._admin:
            is_admin |= hmac.compare_digest(digest, known)
        for known in self._infer:
            is_infer |= hmac.compare_digest(digest, known)
        if is_admin:
            return {"admin", "infer"}
        return {"infer"} if is_infer else set()

    def check(self, authorization: str | None, scope: Scope) -> None:
        """Raise 401 without a valid key in ``authorization`` (the header's value), 403 without ``scope``."""
        if not self.enabled:
            return
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("missing API key (Authorization: Bearer <key>)")
        granted = self.scopes(token)
        if not granted:
            raise Unauthorized("invalid API key")
        if scope not in granted:
            raise Forbidden(f"this key lacks the {scope!r} scope")


def bearer_token(header: str | None) -> str | None:
    """The key from an ``Authorization: Bearer <key>`` header's value, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require(scope: Scope) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency: 401 without a valid key, 403 when the key lacks ``scope``.

    ``async`` because it does no I/O: FastAPI runs it on the event loop, not in a thread.
    """

    async def check(
        request: Request, _documented: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
    ) -> None:
        keys: KeyRing = request.app.state.keys
        keys.check(request.headers.get("authorization"), scope)

    return check
