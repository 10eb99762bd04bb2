"""The ASR replica with an engine that schedules windows itself (vLLM's ``transcribe_async``): each
request goes straight to it, a hang-up cancels it there, its health check is the replica's, and
the replica shuts it down. A fake at the engine seam; the real vLLM engine behind the same seam
runs in tests/vllm_env/test_async_vllm.py."""

import asyncio
import types

import numpy as np
import pytest

from pipeline.asr.ctranslate2 import CTranslate2Engine
from pipeline.core.settings import AsrSettings, Settings
from pipeline.core.types import AsrOptions, Audio, Transcript


class DirectEngine:
    supports_word_timestamps = False
    supports_language_detection = True
    languages = frozenset({"en"})

    def __init__(self):
        self.started, self.cancelled, self.healthy, self.shut = [], [], True, False
        self.release = asyncio.Event()

    def check(self, options):
        pass

    def transcribe(self, batch, options):
        raise AssertionError("the replica must not batch requests for this engine")

    def warm_up(self):
        pass

    async def transcribe_async(self, audio, options):
        self.started.append(audio.duration_s)
        try:
            if audio.duration_s > 1:
                await self.release.wait()  # a long request: held until released (or cancelled)
        except asyncio.CancelledError:
            self.cancelled.append(audio.duration_s)
            raise
        return Transcript((), "en", 1.0, audio.duration_s)

    def check_health(self):
        if not self.healthy:
            raise RuntimeError("EngineDeadError: engine core died")

    def shutdown(self):
        self.shut = True


@pytest.fixture
def replica(monkeypatch):
    from deployments import asr

    engine = DirectEngine()
    monkeypatch.setattr(CTranslate2Engine, "from_settings", classmethod(lambda cls, settings: engine))
    # Outside Serve there is no replica context; the metrics only need an id from it.
    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="test-replica"))
    monkeypatch.setattr(asr.serve, "get_replica_context", lambda: context)
    # compute_nice=0: built in pytest's own process, the replica would lower every thread of the
    # test session by 5 for each test (it did: the suite ran at nice 10 beside its background runs).
    deployment = asr.AsrDeployment.func_or_class(Settings(asr=AsrSettings(model="whisper-tiny.en"), compute_nice=0))
    yield deployment, engine
    deployment.__del__()


def test_requests_go_straight_to_the_engine_and_a_hang_up_cancels_there(replica):
    deployment, engine = replica

    async def main():
        long = asyncio.create_task(deployment.transcribe(Audio(np.zeros(32000, np.float32)), AsrOptions()))
        for _ in range(100):  # let the long one reach the engine (no thread is involved)
            if engine.started:
                break
            await asyncio.sleep(0)
        short = await deployment.transcribe(Audio(np.zeros(8000, np.float32)), AsrOptions())
        assert short.duration_s == 0.5 and not long.done()  # not held behind the long one
        long.cancel()  # the caller hung up
        with pytest.raises(asyncio.CancelledError):
            await long

    asyncio.run(main())
    assert engine.started == [2.0, 0.5] and engine.cancelled == [2.0]


def test_the_engines_health_is_the_replicas_and_the_replica_shuts_it_down(replica):
    deployment, engine = replica
    asyncio.run(deployment.check_health())
    engine.healthy = False
    with pytest.raises(RuntimeError, match="EngineDeadError"):
        asyncio.run(deployment.check_health())
    deployment.__del__()
    assert engine.shut
