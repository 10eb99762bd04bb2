"""License keys: constant-time checks, and a key id that is safe to store and log."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pydantic import SecretStr

from pipeline.core.errors import Unauthorized
from pipeline.core.keys import key_id

__all__ = ["KeyRing", "key_id"]

_SCHEMES = ("token", "bearer")


class KeyRing:
    def __init__(self, keys: Iterable[str | SecretStr]) -> None:
        # Digests have one length, so compare_digest's time does not depend on the key's length.
        plain = (k.get_secret_value() if isinstance(k, SecretStr) else k for k in keys)
        self._digests = [hashlib.sha256(k.encode()).digest() for k in plain]

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, authorization: str | None) -> str:
        """The key id for an ``Authorization: Token|Bearer <key>`` header, else ``UNAUTHORIZED``."""
        if not authorization:
            raise Unauthorized("Missing Authorization header: send 'Authorization: Token <key>'")
        scheme, _, presented = authorization.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() not in _SCHEMES or not presented:
            raise Unauthorized("Malformed Authorization header: send 'Authorization: Token <key>'")
        digest = hashlib.sha256(presented.encode()).digest()
        # No early exit: every stored key is compared whatever the outcome.
        matched = False
        for stored in self._digests:
            matched |= hmac.compare_digest(digest, stored)
        if not matched:
            raise Unauthorized("Invalid license key")
        return key_id(presented)
