"""License key ids: a stable, non-reversible name for a key, safe to store and log."""

from __future__ import annotations

import hashlib


def key_id(key: str) -> str:
    """``key_`` and the first 16 hex digits of the key's SHA-256 (job ownership, limits, logs)."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]
