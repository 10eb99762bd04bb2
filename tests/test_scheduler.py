"""The window scheduler, with a fake engine at the ``WindowEngine`` seam: which windows go into
which batch, who is answered when, and whose error fails whom."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from pipeline.asr.scheduler import (
    InterimSkipped, WindowEngine, WindowResult, WindowScheduler, lost_speech, window_engine,
)
from pipeline.core.errors import InvalidParameter
from pipeline.core.types import AsrOptions, Audio, Segment, Transcript, Word

SR = 16000


class FakeEngine:
    """Cuts audio every 30 s; "decodes" a window into one segment naming its request (the
    first sample's value) and its offset; records every batch. A request whose marker is negative
    fails; language "xx" is refused."""

    supports_word_timestamps = True
    supports_language_detection = True

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, float]]] = []  # (request marker, offset s) per window
        self.detected: list[int] = []
        self.asked: list[str | None] = []  # each window's language as the engine was given it
        self.hears = lambda task: "de"  # the language detected on a window
        self.on_decode = None  # called with the batch before decoding (to act mid-step)
        self.heard_s: float | None = None  # words, one a second, for this much of each window's start
        self.speech_windows = True
        self.speech_from: list[int | None] = []  # what each request's audio was cut with

    @property
    def languages(self) -> frozenset[str]:
        return frozenset({"en", "de"})

    def check(self, options: AsrOptions) -> None:
        if options.language == "xx":
            raise InvalidParameter("no such language", param="language")

    def cut(self, audio: Audio, speech_from: int | None = None) -> list[tuple[int, int]]:
        self.speech_from.append(speech_from)
        n, step = len(audio.samples), 30 * SR
        return [((i, min(i + step, n)),) for i in range(0, n, step)]

    def decode(self, tasks):
        self.batches.append([(int(t.samples[0]), t.offset_s) for t in tasks])
        if self.on_decode is not None:
            self.on_decode(tasks)
        results = []
        for t in tasks:
            marker = int(t.samples[0])
            if marker < 0:
                raise RuntimeError(f"model fault on request {marker}")
            if t.language is None:
                self.detected.append(marker)
            self.asked.append(t.language)
            language = t.language or self.hears(t)
            words = () if self.heard_s is None else tuple(
                Word(f" w{t.offset_s + k:g}", t.offset_s + k, t.offset_s + k + 1, 0.9) for k in range(int(self.heard_s)))
            results.append(
                WindowResult(
                    segments=(Segment(f" r{marker}@{t.offset_s:.0f}", t.offset_s, t.offset_s + 1, -0.1, 3, words),),
                    language=language,
                    language_probability=0.9 if t.language is None else 1.0,
                )
            )
        return results


def clip(marker: int, seconds: float) -> Audio:
    return Audio(np.full(int(seconds * SR), marker, np.float32))


def drain(scheduler: WindowScheduler) -> int:
    steps = 0
    while scheduler.step():
        steps += 1
    return steps


def test_the_fake_engine_fits_the_seam():
    assert isinstance(FakeEngine(), WindowEngine)


def test_windows_of_several_requests_share_a_batch_and_each_is_answered_with_its_own():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=8, max_batch_audio_s=240)
    long = s.submit(clip(1, 95), AsrOptions(language="en"))  # 4 windows
    short = s.submit(clip(2, 5), AsrOptions(language="en"))
    assert s.queued_windows() == 5
    assert s.step()
    assert sorted(engine.batches[0]) == [(1, 0), (1, 30), (1, 60), (1, 90), (2, 0)]
    assert long.result(0).text == "r1@0 r1@30 r1@60 r1@90"
    assert short.result(0).text == "r2@0" and short.result(0).duration_s == 5
    assert not s.step()


def test_a_stream_s_utterance_start_reaches_the_engine_s_cut_in_samples():
    engine = FakeEngine()
    s = WindowScheduler(engine)
    s.submit(clip(1, 12), AsrOptions(language="en", stream="s", speech_from_s=9.5), stream="s")
    s.submit(clip(2, 12), AsrOptions(language="en"))
    assert engine.speech_from == [9.5 * SR, None]


def test_the_batch_budgets_bound_a_step():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=3, max_batch_audio_s=1000)
    s.submit(clip(1, 150), AsrOptions(language="en"))  # 5 windows
    assert drain(s) == 2 and [len(b) for b in engine.batches] == [3, 2]
    engine.batches.clear()
    s = WindowScheduler(engine, max_batch_windows=8, max_batch_audio_s=45)
    s.submit(clip(1, 150), AsrOptions(language="en"))
    assert drain(s) == 5  # 30 s windows, at most 45 s of audio a step: one window each
    s = WindowScheduler(engine, max_batch_windows=8, max_batch_audio_s=1)
    done = s.submit(clip(3, 20), AsrOptions(language="en"))
    assert s.step() and done.done()  # a window above the audio budget still runs, alone


def test_a_short_request_arriving_during_a_long_file_is_served_at_the_next_step():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=2)
    long = s.submit(clip(1, 600), AsrOptions(language="en"))  # 20 windows
    assert s.step()
    short = s.submit(clip(2, 10), AsrOptions(language="en"))
    assert s.step()
    assert (2, 0) in engine.batches[1] and short.done() and not long.done()
    drain(s)
    assert long.result(0).text.count("r1@") == 20


def test_a_request_that_starts_beside_a_running_file_gets_a_step_without_the_file_s_windows():
    # On a CPU a step costs about the sum of its windows: the file's windows beside a new
    # request's first one would make it wait for them (7.9x its solo latency measured).
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=8, max_batch_audio_s=240)
    long = s.submit(clip(1, 600), AsrOptions(language="en"))  # 20 windows
    assert s.step() and len(engine.batches[0]) == 8
    first = s.submit(clip(2, 10), AsrOptions(language="en"))
    second = s.submit(clip(3, 40), AsrOptions(language="en"))  # 2 windows
    assert s.step()
    assert sorted(engine.batches[1]) == [(2, 0), (3, 0), (3, 30)]  # the new ones share their step
    assert first.done() and second.done() and not long.done()
    assert s.step() and {m for m, _ in engine.batches[2]} == {1}  # the file goes on
    drain(s)
    assert long.result(0).text.count("r1@") == 20


def test_a_flood_of_short_requests_takes_turns_with_a_long_file_instead_of_starving_it():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=1)
    long = s.submit(clip(1, 300), AsrOptions(language="en"))  # 10 windows
    for _ in range(10):  # a new 30 s request arrives before every step
        s.submit(clip(2, 30), AsrOptions(language="en"))
        s.step()
    served = [b[0][0] for b in engine.batches]
    # Fair share: the long file got about half of the steps, not none.
    assert served.count(1) >= 3, served
    drain(s)
    assert long.done()


def test_stream_decodes_go_before_files_already_queued():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=1)
    s.submit(clip(1, 90), AsrOptions(language="en"))
    s.submit(clip(2, 90), AsrOptions(language="en"))
    live = s.submit(clip(3, 4), AsrOptions(language="en"), stream="call-1")
    assert s.step() and engine.batches[0] == [(3, 0)] and live.done()


def test_a_newer_interim_of_a_stream_replaces_one_not_started_but_finals_always_run():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=8)
    old = s.submit(clip(3, 2), AsrOptions(language="en"), stream="call-1", interim=True)
    final = s.submit(clip(4, 3), AsrOptions(language="en"), stream="call-1")
    new = s.submit(clip(5, 4), AsrOptions(language="en"), stream="call-1", interim=True)
    other = s.submit(clip(6, 4), AsrOptions(language="en"), stream="call-2", interim=True)
    with pytest.raises(InterimSkipped):
        old.result(0)
    drain(s)
    assert sorted(m for b in engine.batches for m, _ in b) == [4, 5, 6]
    assert final.result(0).text == "r4@0" and new.result(0).text == "r5@0" and other.done()


def test_cancelling_a_request_drops_its_windows_that_have_not_started():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=2)
    gone = s.submit(clip(1, 300), AsrOptions(language="en"))  # 10 windows
    kept = s.submit(clip(2, 30), AsrOptions(language="en"))
    s.step()
    s.cancel(gone)
    assert s.queued_windows() == 0 or kept.done()
    drain(s)
    assert sum(1 for b in engine.batches for m, _ in b if m == 1) <= 2
    assert kept.result(0).text == "r2@0"
    with pytest.raises(CancelledError):
        gone.result(0)


def test_a_request_cancelled_while_its_window_runs_is_not_answered_and_others_are():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=8)
    gone = s.submit(clip(1, 10), AsrOptions(language="en"))
    kept = s.submit(clip(2, 10), AsrOptions(language="en"))
    engine.on_decode = lambda tasks: gone.cancel()  # the client hangs up mid-step
    s.step()
    assert gone.cancelled() and kept.result(0).text == "r2@0"


def test_a_failed_window_fails_only_its_own_request():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=8)
    bad = s.submit(clip(-1, 90), AsrOptions(language="en"))
    good = s.submit(clip(2, 40), AsrOptions(language="en"))
    drain(s)
    with pytest.raises(RuntimeError, match="request -1"):
        bad.result(0)
    assert good.result(0).text == "r2@0 r2@30"
    assert s.queued_windows() == 0


def test_bad_input_is_refused_at_submit_and_silence_is_answered_at_once():
    engine = FakeEngine()
    s = WindowScheduler(engine)
    with pytest.raises(InvalidParameter):
        s.submit(clip(1, 5), AsrOptions(language="xx"))
    nan = clip(1, 5)
    nan.samples[100] = np.nan
    with pytest.raises(Exception, match="not finite"):
        s.submit(nan, AsrOptions())
    empty = s.submit(Audio(np.zeros(0, np.float32)), AsrOptions())
    assert empty.result(0).segments == () and empty.result(0).language_probability == 0.0
    assert not engine.batches


def test_the_language_is_detected_on_the_first_window_only_and_used_for_the_rest():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=8, max_batch_audio_s=240)
    result = s.submit(clip(1, 95), AsrOptions())  # 4 windows, language unknown
    # All four in one step (a 60 s clip alone batches its windows), each marked with its request
    # for the engine to give them the language of the first.
    assert s.step() and engine.batches[0] == [(1, 0), (1, 30), (1, 60), (1, 90)]
    transcript = result.result(0)
    assert transcript.language == "de" and transcript.language_probability == 0.9
    # Windows that do not fit in the first step wait for the language it found.
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=8, max_batch_audio_s=60)
    result = s.submit(clip(1, 95), AsrOptions())
    assert s.step() and engine.batches[0] == [(1, 0), (1, 30)] and engine.detected == [1, 1]
    assert s.step() and engine.batches[1] == [(1, 60), (1, 90)] and engine.detected == [1, 1]
    assert result.result(0).language == "de"


@pytest.mark.parametrize("second_hears", ["de", "en"])
@pytest.mark.parametrize("first_done", [False, True])
def test_windows_start_beside_the_first_before_the_language_is_known(first_done, second_hears):
    # A lane that would idle takes the second window while the first detects the language; the
    # second detects its own, and is decoded again in the first's when it heard another.
    engine = FakeEngine()
    engine.hears = lambda t: second_hears if t.offset_s >= 30 else "de"
    s = WindowScheduler(engine, max_batch_windows=1)
    result = s.submit(clip(1, 60), AsrOptions())  # 2 windows, language unknown
    gate = threading.Event()
    lane = threading.Thread(target=s.step)  # another lane, for the second window

    def on_decode(tasks):
        if tasks[0].language is not None:
            return  # the second window again
        if tasks[0].offset_s == 30:
            assert not first_done or gate.wait(10)  # it ends after the first
        elif first_done:
            lane.start()
            wait_for(lambda: len(engine.batches) == 2)
        else:
            assert s.step()  # the second window, start to end, while the first runs

    engine.on_decode = on_decode
    assert s.step()
    gate.set()
    if first_done:
        lane.join(10)
        assert not lane.is_alive()
    engine.on_decode = None
    while s.step():
        pass
    again = second_hears != "de"
    assert engine.batches == [[(1, 0)], [(1, 30)]] + [[(1, 30)]] * again
    assert engine.asked == [None, None] + ["de"] * again
    transcript = result.result(0)
    assert transcript.text == "r1@0 r1@30"
    assert (transcript.language, transcript.language_probability) == ("de", 0.9)


def test_the_worker_thread_answers_requests_submitted_from_other_threads():
    engine = FakeEngine()
    s = WindowScheduler(engine, max_batch_windows=4)
    worker = threading.Thread(target=s.run, daemon=True)
    worker.start()
    try:
        futures = [s.submit(clip(i, 5 + 20 * i), AsrOptions(language="en")) for i in range(1, 6)]
        texts = [f.result(timeout=10).text for f in futures]
        assert texts[0] == "r1@0" and texts[4].startswith("r5@0 r5@30")
    finally:
        s.close()
        worker.join(timeout=10)
    assert not worker.is_alive()


class GatedEngine(FakeEngine):
    """A FakeEngine whose steps of ``held`` requests block until ``gate`` opens, and which
    records which requests' windows are being decoded at each moment."""

    def __init__(self, held: set[int]) -> None:
        super().__init__()
        self.held = held
        self.gate = threading.Event()
        self.running: set[int] = set()
        self.lanes: list[tuple[int, str]] = []  # (request marker, worker thread) per window
        self._lock = threading.Lock()

    def decode(self, tasks):
        markers = {int(t.samples[0]) for t in tasks}
        with self._lock:
            self.running |= markers
            self.lanes.extend((m, threading.current_thread().name) for m in markers)
        try:
            if markers & self.held:
                assert self.gate.wait(10), "the gate never opened"
            return super().decode(tasks)
        finally:
            with self._lock:
                self.running -= markers


def test_lanes_run_steps_of_different_requests_at_once():
    engine = GatedEngine(held={1, 2})
    s = WindowScheduler(engine, max_batch_windows=1)
    first = s.submit(clip(1, 60), AsrOptions(language="en"))
    second = s.submit(clip(2, 60), AsrOptions(language="en"))
    workers = s.start(2)  # both queued: each lane takes a step of its own request
    try:
        wait_for(lambda: engine.running == {1, 2})  # one step of each, side by side
        engine.gate.set()
        assert first.result(timeout=10).text == "r1@0 r1@30"
        assert second.result(timeout=10).text == "r2@0 r2@30"
    finally:
        engine.gate.set()
        s.close()
    for worker in workers:
        worker.join(timeout=10)
        assert not worker.is_alive()


def test_the_express_lane_answers_a_new_request_while_a_long_file_holds_every_lane():
    engine = GatedEngine(held={1})
    s = WindowScheduler(engine, max_batch_windows=1)
    workers = s.start(1, express=True)
    try:
        long_file = s.submit(clip(1, 600), AsrOptions(language="en"))
        wait_for(lambda: 1 in engine.running)
        # A file longer than one step is never urgent, not even its first step: the express lane
        # stays free for a request that it answers in one step, and for streams.
        short = s.submit(clip(2, 10), AsrOptions(language="en"))
        assert short.result(timeout=10).text == "r2@0"  # while the file's step still blocks
        assert not long_file.done()
        stream = s.submit(clip(3, 5), AsrOptions(language="en"), stream="live")
        assert stream.result(timeout=10).text == "r3@0"
        engine.gate.set()
        assert long_file.result(timeout=10).text.count("r1@") == 20
    finally:
        engine.gate.set()
        s.close()
    for worker in workers:
        worker.join(timeout=10)
    assert {lane for marker, lane in engine.lanes if marker == 1} == {"asr-step-0"}
    assert {lane for marker, lane in engine.lanes if marker != 1} == {"asr-express-1"}


def wait_for(condition, timeout_s: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Observer:
    def __init__(self):
        self.steps, self.waits, self.answers = [], [], []

    def step(self, windows, audio_s, queued_windows):
        self.steps.append((windows, audio_s, queued_windows))

    def queued(self, wait_s):
        self.waits.append(wait_s)

    def answered(self, audio_s, elapsed_s):
        self.answers.append((audio_s, elapsed_s))


def test_the_observer_sees_batch_sizes_queue_times_and_answers():
    now = [100.0]
    observer = Observer()
    s = WindowScheduler(FakeEngine(), max_batch_windows=2, observer=observer, clock=lambda: now[0])
    s.submit(clip(1, 60), AsrOptions(language="en"))
    s.submit(clip(2, 10), AsrOptions(language="en"))
    now[0] = 101.5
    drain(s)
    assert observer.steps == [(2, 40.0, 3), (1, 30.0, 1)]
    assert observer.waits == [1.5, 1.5]
    assert sorted(observer.answers) == [(10.0, 1.5), (60.0, 1.5)]


class WholeEngine:
    """An engine that takes whole audios only (as transformers and vLLM do here)."""

    supports_word_timestamps = False
    supports_language_detection = True
    languages = frozenset({"en"})

    def __init__(self):
        self.calls = []

    def check(self, options):
        pass

    def transcribe(self, batch, options):
        self.calls.append([(len(a.samples), o.language) for a, o in zip(batch, options)])
        return [Transcript((Segment(f" {len(a.samples)}", 0, 1, -0.1, 1),), "en", 0.5, a.duration_s) for a in batch]


def test_engines_that_take_whole_audios_plug_in_with_a_request_as_one_window():
    engine = WholeEngine()
    adapted = window_engine(engine)
    assert isinstance(adapted, WindowEngine) and window_engine(FakeEngine()).__class__ is FakeEngine
    s = WindowScheduler(adapted, max_batch_windows=2, max_batch_audio_s=float("inf"))
    futures = [s.submit(clip(1, 100 * i), AsrOptions()) for i in (1, 2, 3)]
    drain(s)
    assert engine.calls == [[(1600000, None), (3200000, None)], [(4800000, None)]]
    assert [f.result(0).text for f in futures] == ["1600000", "3200000", "4800000"]


def test_a_stream_marks_its_decodes_and_an_interim_replaced_by_newer_audio_costs_it_nothing():
    """The streaming session names its stream and its interims to the scheduler; an interim the
    scheduler skipped (newer audio of the stream won) gives no results, and the finals still come."""
    import asyncio

    from pipeline.streaming.session import StreamingSession, StreamOptions

    seen = []

    async def transcribe(audio, opts):
        seen.append((opts.stream, opts.interim))
        if opts.interim:
            raise InterimSkipped("newer audio won")
        words = (Word(" hello", 0.1, 0.5, 0.9),)
        return Transcript((Segment(" hello", 0.1, 0.5, -0.1, 1, words),), "en", 1.0, audio.duration_s)

    def vad(samples):
        nonzero = np.flatnonzero(samples)
        return [(int(nonzero[0]), int(nonzero[-1]) + 1)] if len(nonzero) else []

    session = StreamingSession(transcribe, StreamOptions(interim_every_s=0.5, endpointing_ms=300), vad=vad)
    speech = np.full(SR * 2, 0.1, np.float32)
    silence = np.zeros(SR, np.float32)

    async def go():
        events = []
        for chunk in np.split(np.concatenate([speech, silence]), 30):
            events += await session.feed(chunk)
        return events

    events = asyncio.run(go())
    assert {s for s, _ in seen} == {session.stream_id} and (session.stream_id, True) in seen
    finals = [e for e in events if e.get("is_final")]
    assert [e["text"].strip() for e in finals if e["text"]] == ["hello"]


def test_a_fault_outside_the_engine_fails_the_step_s_requests_and_the_scheduler_goes_on():
    class Broken(Observer):
        def step(self, windows, audio_s, queued_windows):
            raise RuntimeError("metrics backend down")

    s = WindowScheduler(FakeEngine(), max_batch_windows=1, observer=Broken())
    first = s.submit(clip(1, 5), AsrOptions(language="en"))
    second = s.submit(clip(2, 5), AsrOptions(language="en"))
    assert s.step() and s.step() and not s.step()
    for f in (first, second):
        with pytest.raises(RuntimeError, match="metrics backend"):
            f.result(0)


def test_lost_speech_is_what_no_word_covers_across_pieces_in_stretches_long_enough():
    s = SR
    words = (Word(" a", 0.0, 1.0, 0.9), Word(" b", 12.0, 13.0, 0.9))
    pieces = ((0, 5 * s), (10 * s, 15 * s))  # the silence between them left out of the window
    # 1.3-5 s and 10-11.7 s are one stretch (no word between them), 13.3-15 s another.
    assert lost_speech(pieces, [Segment(" a b", 0.0, 13.0, -0.1, 2, words)]) == [
        ((int(1.3 * s), 5 * s), (10 * s, int(11.7 * s))), ((int(13.3 * s), 15 * s),)]
    # Words 2 s apart leave 1.4 s: a pause, not lost speech; nor is a window without words.
    close = (Word(" a", 0.0, 1.0, 0.9), Word(" b", 3.0, 4.0, 0.9))
    assert lost_speech(((0, 4 * s),), [Segment(" a b", 0.0, 4.0, -0.1, 2, close)]) == []
    assert lost_speech(((0, 10 * s),), [Segment(" r", 0.0, 1.0, -0.1, 3)]) == []


@pytest.mark.parametrize("stream, interim, speech_windows",
                         [(None, False, True), ("s1", False, True), ("s1", True, True), (None, False, False)])
def test_speech_a_window_lost_is_decoded_again_once(stream, interim, speech_windows):
    """Whisper can end a window's decode early or skip a line: the stretch of a window that came
    back without words is decoded on its own (not again if that loses words too), and the
    transcript is in time order. Not a stream's interim (redone with more audio anyway, and waited
    on live), nor where windows hold silence too (the VAD off, whole-audio engines)."""
    engine = FakeEngine()
    engine.heard_s = 2  # each decode hears the first 2 s of its window
    engine.speech_windows = speech_windows
    scheduler = WindowScheduler(engine)
    future = scheduler.submit(clip(5, 10), AsrOptions(language="en"), stream=stream, interim=interim)
    drain(scheduler)
    transcript = future.result(timeout=1)
    if interim or not speech_windows:
        assert [offset for batch in engine.batches for _, offset in batch] == [0.0]
        assert [w.text for w in transcript.words] == [" w0", " w1"]
        return
    # The window (0-10 s), then the stretch after its last word and margin (2.3-10 s), once.
    assert [offset for batch in engine.batches for _, offset in batch] == [0.0, 2.3]
    assert [w.text for w in transcript.words] == [" w0", " w1", " w2.3", " w3.3"]
    assert [s.start for s in transcript.segments] == sorted(s.start for s in transcript.segments)
