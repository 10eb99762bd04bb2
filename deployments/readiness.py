"""Readiness as the Serve controller sees it, answered without waiting on a busy controller.

/ready must not queue behind transcriptions (review finding 14), so it never asks the deployments
themselves; it asks the controller whether each deployment has a running replica. On a loaded
machine the controller itself can take seconds to answer, and a readiness probe that times out is
a pod taken out of service for being busy. So a probe waits for a fresh status only briefly; past
that it gets the last status the controller gave (while that is recent), and the refresh goes on
in the background for the next probe.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from ray import serve

logger = logging.getLogger("ray.serve")


def app_is_running(app_name: str) -> bool:
    """True when every deployment of ``app_name`` has a running replica: one whose constructor
    (which loads its model) has returned and which passes its health checks. Blocks on a call to
    the Serve controller."""
    deployments = serve.status().applications[app_name].deployments
    return bool(deployments) and all(d.replica_states.get("RUNNING", 0) > 0 for d in deployments.values())


class Readiness:
    """The last answer of ``probe`` (a blocking call, run in a thread), refreshed by each caller.

    ``ready()`` starts a refresh unless one is running, waits for it up to ``wait_s``, and
    otherwise answers the last result if it is younger than ``stale_s``. Until a first answer
    exists, and once the last one is older than ``stale_s``, it waits up to ``first_wait_s``.
    A probe that raises counts as not ready.
    """

    def __init__(self, probe: Callable[[], bool], *, wait_s: float = 0.5, first_wait_s: float = 5.0,
                 stale_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._wait_s = wait_s
        self._first_wait_s = first_wait_s
        self._stale_s = stale_s
        self._clock = clock
        self._refresh: asyncio.Task[bool] | None = None
        self._last: tuple[bool, float] | None = None  # (ready, when the probe was started)

    async def ready(self) -> bool:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._run(self._clock()))
        fresh_enough = self._last is not None and self._clock() - self._last[1] < self._stale_s
        try:
            return await asyncio.wait_for(asyncio.shield(self._refresh), self._wait_s if fresh_enough else self._first_wait_s)
        except TimeoutError:
            if fresh_enough and self._last is not None:
                return self._last[0]
            logger.warning("/ready: no status from the Serve controller within %.1f s", self._first_wait_s)
            return False

    async def _run(self, started: float) -> bool:
        try:
            ready = await asyncio.to_thread(self._probe)
        except Exception as exc:  # noqa: BLE001 - no answer from the controller is no readiness
            logger.warning("/ready: no status from the Serve controller: %r", exc)
            ready = False
        if self._last is None or started >= self._last[1]:
            self._last = (ready, started)
        return ready
