"""Thin Ray Serve adapters around ``pipeline`` objects. The app is built by ``deployments.app``."""

from __future__ import annotations

import hashlib
import logging
import os

from pipeline.core.errors import HarkError
from pipeline.core.settings import Settings


def replica_info(settings: Settings, **extra) -> dict:
    """Which replica answered (and its process), and a digest of the settings it runs with (never
    the settings themselves: they hold license keys and the webhook secret)."""
    from ray import serve

    return {
        "replica": serve.get_replica_context().replica_id.unique_id,
        "pid": os.getpid(),
        "settings_sha256": hashlib.sha256(settings.model_dump_json().encode()).hexdigest(),
        **extra,
    }


def yield_cpu_to_the_front(settings: Settings) -> None:
    """Lower this replica's CPU priority by ``compute_nice`` (called by the compute-heavy
    replicas: decoding, ASR, diarization). Their work only waits a little longer when the machine
    is saturated, while the proxy and ingress, which answer every request and ``/health``, are
    scheduled ahead of it. Any process may lower its own priority.

    On Linux a priority belongs to a thread (``os.nice`` changes only the caller's, and Serve runs
    a replica's constructor on a thread of its own), so every thread of the process is lowered;
    threads started later inherit it from the thread that starts them. (Ray runs its own threads at
    nice 0 and the Python threads of a worker at 15, or at 0 in a Ray that ``hark serve`` started:
    ``launch.front_first``; 19 is the lowest priority there is.)"""
    if not settings.compute_nice:
        return
    tasks = f"/proc/{os.getpid()}/task"
    for tid in (int(t) for t in os.listdir(tasks)) if os.path.isdir(tasks) else [0]:
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + settings.compute_nice))
        except OSError:  # the thread has ended meanwhile
            continue


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


class BriefUserErrors(logging.Filter):
    """Serve logs every exception a replica method raises with its traceback ("Request failed.").
    A ``HarkError`` below 500 is the caller's (a forbidden URL, audio that does not decode), not a
    fault: it becomes one warning line with its code. Everything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HarkError) and error.status < 500:
            message = " ".join(error.message.split())  # one line, whatever the message holds
            record.msg = f"{record.getMessage().rstrip('.')}: {error.code} ({error.status}) {message}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def log_user_errors_briefly() -> None:
    """Put ``BriefUserErrors`` on this replica's Serve logger (once)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, BriefUserErrors) for f in serve_logger.filters):
        serve_logger.addFilter(BriefUserErrors())


# Every replica imports this package before its deployment class runs, and Serve's logging setup
# replaces the logger's handlers, not its filters: refusals are everyday answers on every
# deployment (Accounting's 429s, Jobs' 404s, AudioFetch's bad URLs), never tracebacks.
log_user_errors_briefly()
