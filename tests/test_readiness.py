"""/ready's answer from the Serve controller's status: a slow controller delays no probe."""

import asyncio
import threading

from deployments.readiness import Readiness


class Controller:
    """A controller status call that answers ``ready`` once ``release`` is set."""

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.calls = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self) -> bool:
        self.calls += 1
        assert self.release.wait(10)
        return self.ready


def run(coro):
    return asyncio.run(coro)


def test_first_probe_waits_for_the_controller_then_answers_the_last_status_at_once():
    async def scenario() -> None:
        controller = Controller()
        readiness = Readiness(controller, interval_s=0.01, first_wait_s=5)
        assert await readiness.ready() is True  # a first answer is awaited
        controller.release.clear()  # the controller is now busy
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(5):
            assert await readiness.ready() is True  # the last status
        assert loop.time() - started < 1
        controller.ready = False
        controller.release.set()
        await wait_for(readiness, False)
        await readiness.stop()

    run(scenario())


def test_the_controller_is_asked_without_probes():
    """Regression (CI, 2026-12-03): the status was refreshed only by probes, so a probe after a
    quiet minute (older than ``stale_s``) waited for a controller slowed by two transcriptions,
    more than 5 s, and answered 503. Now it is asked every ``interval_s`` from the start."""
    async def scenario() -> None:
        controller = Controller()
        readiness = Readiness(controller, interval_s=0.01)
        readiness.start()
        for _ in range(500):
            if controller.calls >= 3:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the controller was asked {controller.calls} times in 5 s")
        assert await readiness.ready() is True
        await readiness.stop()

    run(scenario())


def test_not_ready_is_asked_again_at_once():
    """Regression (CI): with the status asked only every ``interval_s``, ``hark serve`` said ready
    and a /ready right after it answered 503, the last status being from before the app ran."""
    async def scenario() -> None:
        controller = Controller(ready=False)
        readiness = Readiness(controller, interval_s=600)
        assert await readiness.ready() is False
        controller.ready = True  # the app is up now; the next periodic ask is 10 min away
        assert await readiness.ready() is True
        await readiness.stop()

    run(scenario())


def test_no_first_answer_or_a_stale_one_is_not_ready():
    async def scenario() -> None:
        now = [0.0]
        controller = Controller()
        controller.release.clear()
        readiness = Readiness(controller, interval_s=600, first_wait_s=0.05, stale_s=30, clock=lambda: now[0])
        assert await readiness.ready() is False  # nothing heard yet
        controller.release.set()
        await wait_for(readiness, True)
        controller.release.clear()  # the controller stops answering
        now[0] = 29.0
        assert await readiness.ready() is True  # recent enough
        now[0] = 61.0
        assert await readiness.ready() is False  # the last answer is too old to stand for now
        controller.release.set()
        await readiness.stop()

    run(scenario())


def test_a_failing_controller_call_is_not_ready():
    def broken() -> bool:
        raise RuntimeError("controller gone")

    async def scenario() -> None:
        readiness = Readiness(broken)
        assert await readiness.ready() is False
        await readiness.stop()

    run(scenario())


async def wait_for(readiness: Readiness, status: bool) -> None:
    for _ in range(500):
        if await readiness.ready() is status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"/ready never became {status}")
