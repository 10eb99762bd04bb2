"""Readiness as the Serve controller sees it, kept fresh in the background.

/ready must not queue behind transcriptions (review finding 14), so it never asks the deployments
themselves; it asks the controller whether each deployment has a running replica. On a loaded
machine the controller itself can take seconds to answer (CI saw more than 5 s with two
transcriptions on 2 cores), and a readiness probe that times out is a pod taken out of service for
being busy. So each ingress replica asks the controller every few seconds whether or not a probe
comes, and a probe answers "ready" at once when the last status said so; a "not ready" is asked
again at once, so that a service that has just come up says so.
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
    """The last answer of ``probe`` (a blocking call, run in a thread), asked every ``interval_s``.

    ``start()`` begins the asking on the running loop (``ready()`` does too, if nothing did).
    ``ready()`` answers "ready" at once when that was the last answer, less than ``stale_s`` ago.
    Otherwise (not ready when last asked, or nothing heard, or too long ago) it asks again now,
    sharing a call in flight, and waits up to ``first_wait_s`` for the answer: a service that has
    just come up is not kept out for up to ``interval_s``. A probe that raises counts as not ready.
    """

    def __init__(self, probe: Callable[[], bool], *, interval_s: float = 5.0, first_wait_s: float = 5.0,
                 stale_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._first_wait_s = first_wait_s
        self._stale_s = stale_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._asking: asyncio.Task[bool] | None = None
        self._last: tuple[bool, float] | None = None  # (ready, when the probe that said so started)
        self._failing = False

    def start(self) -> None:
        """Start asking the controller every ``interval_s``, once, on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._ask_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def ready(self) -> bool:
        self.start()
        if self._last is not None and self._last[0] and self._clock() - self._last[1] < self._stale_s:
            return True
        try:
            return await asyncio.wait_for(asyncio.shield(self._ask_now()), self._first_wait_s)
        except TimeoutError:
            logger.warning("/ready: no status from the Serve controller within %.1f s", self._first_wait_s)
            return False

    def _ask_now(self) -> asyncio.Task[bool]:
        """The call to the controller in flight, or a new one."""
        if self._asking is None or self._asking.done():
            self._asking = asyncio.get_running_loop().create_task(self._ask(self._clock()))
        return self._asking

    async def _ask(self, started: float) -> bool:
        try:
            ready = await asyncio.to_thread(self._probe)
            self._failing = False
        except Exception as exc:  # noqa: BLE001 - no answer from the controller is no readiness
            if not self._failing:  # once per outage, not every interval
                logger.warning("/ready: no status from the Serve controller: %r", exc)
            self._failing, ready = True, False
        if self._last is None or started >= self._last[1]:
            self._last = (ready, started)
        return ready

    async def _ask_forever(self) -> None:
        while True:
            await asyncio.shield(self._ask_now())
            await asyncio.sleep(self._interval_s)
