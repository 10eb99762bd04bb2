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


def test_first_probe_waits_for_the_controller_then_slow_refreshes_answer_the_last_status():
    async def scenario() -> None:
        controller = Controller()
        readiness = Readiness(controller, wait_s=0.05, first_wait_s=5)
        assert await readiness.ready() is True  # a first answer is awaited
        controller.release.clear()  # the controller is now busy
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await readiness.ready() is True  # the last status, after wait_s
        assert loop.time() - started < 1
        calls = controller.calls
        assert await readiness.ready() is True
        assert controller.calls == calls, "a second refresh started while one was running"
        controller.ready = False
        controller.release.set()
        for _ in range(200):  # the refresh in flight ends with the new status
            if await readiness.ready() is False:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the controller's new status never reached /ready")

    run(scenario())


def test_no_first_answer_or_a_stale_one_is_not_ready():
    async def scenario() -> None:
        now = [0.0]
        controller = Controller()
        controller.release.clear()
        readiness = Readiness(controller, wait_s=0.01, first_wait_s=0.05, stale_s=30, clock=lambda: now[0])
        assert await readiness.ready() is False  # nothing heard yet
        controller.release.set()
        assert await readiness.ready() is True
        controller.release.clear()
        now[0] = 29.0
        assert await readiness.ready() is True  # recent enough
        now[0] = 61.0
        assert await readiness.ready() is False  # the last answer is too old to stand for now
        controller.release.set()

    run(scenario())


def test_a_failing_controller_call_is_not_ready():
    def broken() -> bool:
        raise RuntimeError("controller gone")

    assert run(Readiness(broken).ready()) is False
