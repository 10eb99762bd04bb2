"""License keys: constant-time checks, and a key id that is safe to store and log."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pipeline.core.errors import Unauthorized

_SCHEMES = ("token", "bearer")


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (for job ownership, limits and logs)."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    def __init__(self, keys: Iterable[str]) -> None:
        # Digests have one length, so compare_digest's time does not depend on the key's length.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

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
