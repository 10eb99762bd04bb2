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


def adopt_serve_logging() -> None:
    """Route the core's loggers (``pipeline.*``) to this replica's Serve log handlers, so that
    what the job runner or the diarizer logs lands in the replica's log like Serve's own lines.
    Called from a replica's constructor, once Serve has set its handlers up."""
    import logging

    serve_logger = logging.getLogger("ray.serve")
    core = logging.getLogger("pipeline")
    if serve_logger.handlers and not core.handlers:
        for handler in serve_logger.handlers:
            core.addHandler(handler)
        core.setLevel(logging.INFO)
        core.propagate = False
