"""Readiness as the Serve controller sees it, kept fresh in the background.

/ready must not queue behind transcriptions (review finding 14), so it never asks the deployments
themselves; it asks the controller whether each deployment has a running replica. On a loaded
machine the controller itself can take seconds to answer (CI saw more than 5 s with two
transcriptions on 2 cores), and a readiness probe that times out is a pod taken out of service for
being busy. So each ingress replica asks the controller every few seconds whether or not a probe
comes, and a probe answers the last status at once.
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
    ``ready()`` answers the last answer at once. Until a first answer exists, and once the last
    one is older than ``stale_s`` (the controller silent that long), it waits up to
    ``first_wait_s`` for the next one, and is not ready without it. A probe that raises counts
    as not ready.
    """

    def __init__(self, probe: Callable[[], bool], *, interval_s: float = 5.0, first_wait_s: float = 5.0,
                 stale_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._first_wait_s = first_wait_s
        self._stale_s = stale_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[bool] | None = None  # resolved by the next answer
        self._last: tuple[bool, float] | None = None  # (ready, when it was answered)

    def start(self) -> None:
        """Start asking the controller, once, on the running event loop."""
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            self._task = loop.create_task(self._ask_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def ready(self) -> bool:
        self.start()
        if self._last is not None and self._clock() - self._last[1] < self._stale_s:
            return self._last[0]
        assert self._next is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._next), self._first_wait_s)
        except TimeoutError:
            logger.warning("/ready: no status from the Serve controller within %.1f s", self._first_wait_s)
            return False

    async def _ask_forever(self) -> None:
        failing = False
        while True:
            try:
                ready = await asyncio.to_thread(self._probe)
                failing = False
            except Exception as exc:  # noqa: BLE001 - no answer from the controller is no readiness
                if not failing:  # once per outage, not every interval
                    logger.warning("/ready: no status from the Serve controller: %r", exc)
                failing, ready = True, False
            self._last = (ready, self._clock())
            answered, self._next = self._next, asyncio.get_running_loop().create_future()
            assert answered is not None
            answered.set_result(ready)
            await asyncio.sleep(self._interval_s)
