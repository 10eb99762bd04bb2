"""The one transcription flow, the job runner's failure policy and the stream's typed options,
with fakes at the Protocol seams (the real parts run in tests/test_api.py and friends)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from pipeline.asr.base import Capabilities
from pipeline.core.errors import InvalidParameter, RateLimited, ServiceUnavailable, WorkerLost
from pipeline.core.settings import Settings
from pipeline.core.types import AsrOptions, Audio, Diarization, Segment, SpeakerTurn, Transcript, Word
from pipeline.service.db import sqlite_url
from pipeline.service.jobs import SqlJobStore
from pipeline.service.job_request import JobRequest
from pipeline.service.runner import MAX_RUN_ATTEMPTS, JobRunner
from pipeline.streaming.server import ENDPOINTING_OFF_MS, StreamParams
from pipeline.transcription.flow import TranscriptionFlow
from pipeline.transcription.schemas import ListenParams

AUDIO = Audio(np.zeros(16000 * 2, np.float32))
WORDS = (Word(" Hello", 0.0, 0.5, 0.9), Word(" there.", 1.2, 1.8, 0.8))


class FakeRecognizer:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[AsrOptions] = []
        self.capability_calls = 0
        self.fail = fail

    async def capabilities(self) -> Capabilities:
        self.capability_calls += 1
        await asyncio.sleep(0.01)  # let concurrent first requests pile up
        return Capabilities("fake", word_timestamps=True, language_detection=True, languages=frozenset({"en"}))

    async def transcribe(self, audio: Audio, options: AsrOptions) -> Transcript:
        if self.fail is not None:
            raise self.fail
        self.calls.append(options)
        return Transcript((Segment("Hello there.", 0.0, 1.8, -0.1, 4, WORDS),), "en", 1.0, audio.duration_s)


class FakeSpeakers:
    def __init__(self) -> None:
        self.asked: list[int | None] = []

    async def check(self) -> None:
        pass

    async def diarize(self, audio: Audio, num_speakers: int | None) -> Diarization:
        self.asked.append(num_speakers)
        return Diarization((SpeakerTurn("SPEAKER_00", 0.0, 1.0), SpeakerTurn("SPEAKER_01", 1.0, 2.0)))


class FakeMeter:
    def __init__(self, refuse: bool = False) -> None:
        self.log: list[tuple[str, float]] = []
        self.refuse = refuse

    async def reserve(self, duration_s: float) -> str:
        self.log.append(("reserve", duration_s))
        if self.refuse:
            raise RateLimited("Daily audio quota used up", retry_after=60)
        return "r1"

    async def extend(self, reservation: str, duration_s: float) -> None:
        self.log.append(("extend", duration_s))

    async def settle(self, reservation: str, duration_s: float) -> None:
        self.log.append(("settle", duration_s))

    async def cancel(self, reservation: str) -> None:
        self.log.append(("cancel", 0.0))


def test_flow_diarizes_beside_asr_and_merges_speakers_into_words():
    recognizer, speakers, meter = FakeRecognizer(), FakeSpeakers(), FakeMeter()
    flow = TranscriptionFlow(recognizer, speakers)
    params = ListenParams.parse({"diarize": True, "num_speakers": 2, "timestamps": True})
    result = asyncio.run(flow.run(AUDIO, params, request_id="req_1", meter=meter))
    assert speakers.asked == [2]
    assert recognizer.calls == [AsrOptions(language=None, word_timestamps=True)]  # diarize needs word times
    speaker_of = {w["word"]: w["speaker"] for w in result.body["words"]}
    assert speaker_of["Hello"] == "SPEAKER_00" and speaker_of["there"] == "SPEAKER_01"
    assert result.body["request_id"] == "req_1" and result.body["text"] == "Hello there."
    assert meter.log == [("reserve", 2.0), ("settle", 2.0)]


def test_flow_quota_refusal_costs_no_transcription():
    recognizer, meter = FakeRecognizer(), FakeMeter(refuse=True)
    with pytest.raises(RateLimited):
        asyncio.run(TranscriptionFlow(recognizer, FakeSpeakers()).run(AUDIO, ListenParams(), request_id="r", meter=meter))
    assert recognizer.calls == [] and meter.log == [("reserve", 2.0)]


def test_flow_failed_or_cancelled_transcription_gives_its_reservation_back():
    meter = FakeMeter()
    with pytest.raises(ServiceUnavailable):
        asyncio.run(TranscriptionFlow(FakeRecognizer(fail=ServiceUnavailable("busy")), FakeSpeakers())
                    .run(AUDIO, ListenParams(), request_id="r", meter=meter))
    assert meter.log == [("reserve", 2.0), ("cancel", 0.0)]

    class Stuck(FakeRecognizer):
        async def transcribe(self, audio, options):
            await asyncio.Event().wait()

    async def cancel_midway():
        task = asyncio.ensure_future(TranscriptionFlow(Stuck(), FakeSpeakers()).run(AUDIO, ListenParams(), request_id="r", meter=meter))
        while not meter.log:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    meter.log.clear()
    asyncio.run(cancel_midway())
    assert meter.log == [("reserve", 2.0), ("cancel", 0.0)]


def test_flow_asks_capabilities_once_and_refuses_before_any_audio():
    recognizer = FakeRecognizer()
    flow = TranscriptionFlow(recognizer, FakeSpeakers())

    async def burst():
        await asyncio.gather(*(flow.check(ListenParams()) for _ in range(20)))
        with pytest.raises(InvalidParameter) as refused:
            await flow.check(ListenParams.parse({"language": "fr"}))
        return refused.value

    err = asyncio.run(burst())
    assert recognizer.capability_calls == 1
    assert err.extra["param"] == "language"


class FakeAudio:
    async def from_url(self, url: str) -> Audio:
        return AUDIO

    async def from_blob(self, url: str) -> Audio:
        return AUDIO


def _run_one(tmp_path, failure: Exception, run_attempts: int = 1):
    """Claim a job and run it once against an ASR failing with ``failure``; the job after that."""
    settings = Settings(data_dir=tmp_path)
    store = SqlJobStore(sqlite_url(tmp_path / "jobs.sqlite3"))
    runner = JobRunner(settings, store, FakeAudio(), TranscriptionFlow(FakeRecognizer(failure), FakeSpeakers()),
                       meter_for=lambda key_id: FakeMeter())

    async def scenario():
        # Written to the store directly: submit() would also start the runner's own loops.
        created = store.create("key_a", {"params": {}, "url": "http://media.test/a.wav"}, None)
        for _ in range(run_attempts):  # earlier runs that ended with the worker dead
            job = store.claim("w", 30.0)
            store.requeue(job.job_id, "w", 0.0)
        job = store.claim(runner._worker, 30.0)
        await runner._run(job)
        return store.get(created.job_id)

    return asyncio.run(scenario())


def test_runner_requeues_a_busy_job_without_using_up_a_run(tmp_path):
    job = _run_one(tmp_path, ServiceUnavailable(), run_attempts=0)
    assert job.api_status == "processing" and job.run_attempts == 0


def test_runner_requeues_after_a_dead_worker_until_the_runs_are_used_up(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.service.runner"):
        again = _run_one(tmp_path / "a", WorkerLost(), run_attempts=0)
    assert again.api_status == "processing" and again.run_attempts == 1
    # The operator (and the multi-node test) can tell a death's rerun from any other.
    assert f"job {again.job_id}: a worker it needed died (run 1 of at most {MAX_RUN_ATTEMPTS})" in caplog.text
    failed = _run_one(tmp_path / "b", WorkerLost(), run_attempts=MAX_RUN_ATTEMPTS - 1)
    assert failed.api_status == "failed"
    assert f"died on this job {MAX_RUN_ATTEMPTS} times" in failed.payload()["error"]["error"]


def test_runner_keeps_a_refusal_as_the_jobs_error(tmp_path):
    job = _run_one(tmp_path, InvalidParameter("no", param="language"), run_attempts=0)
    assert job.api_status == "failed" and job.payload()["error"]["code"] == "INVALID_PARAMETER"


def test_idempotency_key_reused_for_another_request_is_refused(tmp_path):
    store = SqlJobStore(sqlite_url(tmp_path / "jobs.sqlite3"))
    runner = JobRunner(Settings(data_dir=tmp_path), store, FakeAudio(),
                       TranscriptionFlow(FakeRecognizer(), FakeSpeakers()), meter_for=lambda key_id: FakeMeter())

    async def scenario():
        first = await runner.submit(JobRequest("key_a", ListenParams(), url="http://a.test/1.wav", idempotency_key="k"))
        again = await runner.submit(JobRequest("key_a", ListenParams(), url="http://a.test/1.wav", idempotency_key="k"))
        assert again["job_id"] == first["job_id"]
        with pytest.raises(InvalidParameter, match="different request"):
            await runner.submit(JobRequest("key_a", ListenParams(), url="http://a.test/2.wav", idempotency_key="k"))
        with pytest.raises(InvalidParameter, match="255"):
            await runner.submit(JobRequest("key_a", ListenParams(), url="http://a.test/1.wav", idempotency_key="k" * 256))

    asyncio.run(scenario())


def test_stream_params_are_typed_and_name_the_bad_option():
    params = StreamParams.parse({"encoding": "Ogg-Opus", "sample_rate": "48000", "channels": "2",
                                 "endpointing": "false", "interim_results": "false", "language": "EN", "other": "x"})
    assert (params.encoding, params.sample_rate, params.channels, params.language) == ("ogg-opus", 48000, 2, "en")
    assert params.session_options().endpointing_ms == ENDPOINTING_OFF_MS
    assert params.session_options().interim_results is False
    assert StreamParams.parse({}).session_options().endpointing_ms == 300
    # A fragment waits for a longer pause by default; an endpoint the client gives holds for all.
    assert StreamParams.parse({}).session_options().fragment_endpointing_ms == 800
    assert StreamParams.parse({"endpointing": "300"}).session_options().fragment_endpointing_ms == 0
    for query, param, message in (
        ({"sample_rate": "lots"}, "sample_rate", "must be an integer"),
        ({"channels": "9"}, "channels", "between 1 and 8"),
        ({"endpointing": "5"}, "endpointing", "between 10 and 60000"),
        ({"interim_results": "maybe"}, "interim_results", "true or false"),
    ):
        with pytest.raises(InvalidParameter, match=message) as refused:
            StreamParams.parse(query)
        assert refused.value.extra["param"] == param


# ---- leases under load, and lost leases -----------------------------------------------------------

def _lease_settings(tmp_path, **extra) -> Settings:
    return Settings(data_dir=tmp_path, jobs_lease_s=1.0, webhook_secret="s", url_allowlist=["127.0.0.1/32"], **extra)


def _wait(predicate, timeout_s: float, what: str):
    async def poll():
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not (value := predicate()):
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)
        return value
    return poll()


def test_slow_webhook_receivers_cannot_starve_lease_renewals(tmp_path):
    # Before: deliveries and store calls shared the default thread pool (6 threads on 2 cores);
    # ten receivers dripping their answer held every thread, the running job's lease was not
    # renewed, and another runner would take the job over and run (and charge) it again.
    import sqlite3
    import threading
    import time

    from servers import WebhookReceiver

    path = tmp_path / "jobs.sqlite3"
    store = SqlJobStore(sqlite_url(path))
    meter = FakeMeter()

    class Slow(FakeRecognizer):
        async def transcribe(self, audio, options):
            await asyncio.sleep(3.0)  # three leases long
            return await super().transcribe(audio, options)

    takeovers: list[str] = []
    stop = threading.Event()

    def another_runner():  # what any other replica would take over: running jobs with a lapsed lease
        db = sqlite3.connect(path)
        while not stop.is_set():
            rows = db.execute("SELECT job_id FROM jobs WHERE state='running' AND lease_expires_at < ?", (time.time(),))
            takeovers.extend(r[0] for r in rows)
            stop.wait(0.05)

    with WebhookReceiver("s") as receiver:
        for _ in range(10):
            job = store.create("key_a", {"params": {}, "url": "http://media.test/a.wav"}, receiver.url("/drip"))
            store.claim("w-old", 30.0)
            store.finish(job.job_id, "w-old", result={})
        runner = JobRunner(_lease_settings(tmp_path, webhook_timeout_s=30.0), store, FakeAudio(),
                           TranscriptionFlow(Slow(), FakeSpeakers()), meter_for=lambda key_id: meter)
        watcher = threading.Thread(target=another_runner, daemon=True)

        async def scenario():
            runner.start()
            await _wait(lambda: len(receiver.attempts) == 10, 10, "ten dripping deliveries")
            slow = store.create("key_b", {"params": {}, "url": "http://media.test/b.wav"}, None)
            watcher.start()
            done = await _wait(lambda: (j := store.get(slow.job_id)).api_status != "processing" and j, 20, "the job")
            return done

        try:
            done = asyncio.run(scenario())
        finally:
            stop.set()
    assert takeovers == []
    assert done.api_status == "completed" and done.run_attempts == 1
    assert meter.log == [("reserve", 2.0), ("settle", 2.0)]


def _lost_lease_run(tmp_path, caplog, recognizer_for):
    store = SqlJobStore(sqlite_url(tmp_path / "jobs.sqlite3"))
    meter, lost = FakeMeter(), []

    def steal():
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE jobs SET lease_owner='thief'")

    async def report(job_id: str, when: str) -> None:
        lost.append(when)

    runner = JobRunner(_lease_settings(tmp_path), store, FakeAudio(),
                       TranscriptionFlow(recognizer_for(steal), FakeSpeakers()),
                       meter_for=lambda key_id: meter, on_lease_lost=report)

    async def scenario():
        job = store.create("key_a", {"params": {}, "url": "http://media.test/a.wav"}, None)
        with caplog.at_level("WARNING", logger="pipeline.service.runner"):
            runner.start()
            await _wait(lambda: lost, 10, "the lost lease to be noticed")
        return store.get(job.job_id)

    return asyncio.run(scenario()), meter, lost


class _Stealing(FakeRecognizer):
    """A recognizer that takes the job's lease away (``steal``) while it transcribes."""

    def __init__(self, steal):
        super().__init__()
        self.steal = steal


def test_a_lease_lost_while_running_stops_the_run_uncharged_and_is_reported(tmp_path, caplog):
    class StolenWhileRunning(_Stealing):
        async def transcribe(self, audio, options):
            self.steal()
            await asyncio.Event().wait()  # the heartbeat must notice and stop this run

    job, meter, lost = _lost_lease_run(tmp_path, caplog, StolenWhileRunning)
    assert lost == ["running"] and job.state == "running"  # left to the runner that holds it now
    assert meter.log == [("reserve", 2.0), ("cancel", 0.0)]
    assert any("lease" in r.getMessage() and job.job_id in r.getMessage() for r in caplog.records)


def test_a_lease_lost_before_the_charge_is_never_charged_twice(tmp_path, caplog):
    class StolenBeforeTheEnd(_Stealing):
        async def transcribe(self, audio, options):
            self.steal()  # and answer at once, before any heartbeat
            return await super().transcribe(audio, options)

    job, meter, lost = _lost_lease_run(tmp_path, caplog, StolenBeforeTheEnd)
    assert lost == ["charge"] and job.state == "running"
    assert meter.log == [("reserve", 2.0), ("cancel", 0.0)]


# ---- CPU work stays off the event loop ----------------------------------------------------------

def _meeting(hours: float):
    """A long meeting's worth of words (~2.8 words/s) and speaker turns (~every 4 s)."""
    n_words, n_turns = int(hours * 3600 * 2.8), int(hours * 3600 / 4)
    words = tuple(Word(f" w{i}", i / 2.8, i / 2.8 + 0.3, 0.9) for i in range(n_words))
    turns = tuple(SpeakerTurn(f"S{i % 4}", i * 4.0, i * 4.0 + 3.8) for i in range(n_turns))
    return words, turns


def _merge_reference(words, turns):
    """The word-by-turn loop the vectorised merge replaced (WhisperX's rule, nearest turn in gaps)."""
    raw = []
    for w in words:
        best, best_overlap = None, 0.0
        for t in turns:
            overlap = min(w.end, t.end) - max(w.start, t.start)
            if overlap > best_overlap:
                best, best_overlap = t, overlap
        if best is None:
            middle = (w.start + w.end) / 2
            best = min(turns, key=lambda t: 0.0 if t.start <= middle <= t.end else min(abs(middle - t.start), abs(middle - t.end)))
        raw.append(best.speaker)
    names = {}
    return tuple(names.setdefault(label, f"SPEAKER_{len(names):02d}") for label in raw)


def test_vectorised_merge_matches_the_reference_rule():
    from pipeline.transcription.merge import assign_word_speakers

    rng = np.random.default_rng(7)
    for _ in range(30):
        starts = np.sort(rng.uniform(0, 60, rng.integers(1, 40)))
        words = [Word(" w", float(s), float(s + rng.uniform(0.05, 1.0)), 0.9) for s in starts]
        turn_starts = rng.uniform(0, 60, rng.integers(1, 12))  # overlapping, unsorted, with gaps
        turns = [SpeakerTurn(f"S{rng.integers(0, 3)}", float(s), float(s + rng.uniform(0.2, 8))) for s in turn_starts]
        assert assign_word_speakers(words, turns) == _merge_reference(words, turns)


def test_a_two_hour_diarized_result_never_blocks_the_event_loop():
    # Review finding 13: the merge (O(words x turns), seconds for a 2 h meeting) and the render ran
    # on the ingress's event loop, so /health and every stream stalled behind them.
    words, turns = _meeting(2.0)

    class Long(FakeRecognizer):
        async def transcribe(self, audio, options):
            return Transcript((Segment("long", 0.0, 7200.0, -0.1, 4, words),), "en", 1.0, 7200.0)

    class ManyTurns(FakeSpeakers):
        async def diarize(self, audio, num_speakers):
            return Diarization(turns)

    async def scenario():
        lags, done = [], asyncio.Event()

        async def ticker():
            loop = asyncio.get_running_loop()
            while not done.is_set():
                before = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - before - 0.01)

        tick = asyncio.ensure_future(ticker())
        result = await TranscriptionFlow(Long(), ManyTurns()).run(
            Audio(np.zeros(16000, np.float32)), ListenParams.parse({"diarize": True, "timestamps": True}), request_id="r")
        done.set()
        await tick
        return result, lags

    import gc

    # Objects left by earlier tests in this process are not the flow's: a full collection of them
    # (triggered by the render's allocations) would stall the loop whatever the flow does.
    gc.collect()
    gc.freeze()
    try:
        result, lags = asyncio.run(scenario())
    finally:
        gc.unfreeze()
    assert len(result.body["words"]) == len(words) and {w["speaker"] for w in result.body["words"]} == {
        "SPEAKER_00", "SPEAKER_01", "SPEAKER_02", "SPEAKER_03"}
    # Before: 0.58 s (the render) and ~20 s (the merge). The margin is for a busy machine's scheduler.
    assert max(lags) < 0.25, f"the event loop stalled for {max(lags):.2f} s"
