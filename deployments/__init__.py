"""Thin Ray Serve adapters around ``pipeline`` objects. The app is built by ``deployments.app``."""

from __future__ import annotations

import hashlib

from pipeline.core.settings import Settings


def replica_info(settings: Settings, **extra) -> dict:
    """Which replica answered, and a digest of the settings it runs with (never the settings
    themselves: they hold license keys and the webhook secret)."""
    from ray import serve

    return {
        "replica": serve.get_replica_context().replica_id.unique_id,
        "settings_sha256": hashlib.sha256(settings.model_dump_json().encode()).hexdigest(),
        **extra,
    }
