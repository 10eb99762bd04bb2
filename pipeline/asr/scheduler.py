"""Continuous batching across requests: the ASR replica schedules windows, not requests.

A request is cut into windows (≤ 30 s spans with absolute offsets, ``pipeline.asr.chunking``);
the windows of every request in flight wait in one queue; each step the engine decodes the next
batch of them, and a request is answered the moment its own last window is done. A request that
arrives while a batch runs joins the next step; nothing waits for a whole "request batch".

Order of service: live-stream decodes first, then a fair share per request. Each request carries
a virtual clock of the audio seconds it has been served, started at the scheduler's clock when it
arrives (a virtual clock that advances with the work served, as in fair queueing): a new short
request is served next, yet a flood of short ones only takes turns with a long file, never
starves it.

Steps run in lanes (``start``): one worker thread each, several at once where the engine runs a
step on few threads (CTranslate2 on a CPU: one per core), and an express lane that takes only a
stream's decode or a new request that one step answers whole, so neither waits for a step of a
long file.

The engine seam is ``WindowEngine``: cut an audio into spans, decode a batch of windows (detecting
the language of a window that has none). Thread-safe; ``run`` is a lane's loop, ``step`` one
batch (tests call it directly).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np

from pipeline.asr.base import check_audio
from pipeline.core.errors import HarkError
from pipeline.core.types import SAMPLE_RATE, AsrOptions, Audio, Segment, Transcript, as_float32

if TYPE_CHECKING:
    from pipeline.asr.base import AsrEngine
    from pipeline.core.settings import AsrSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowTask:
    """One window of one request, as the engine decodes it."""

    samples: np.ndarray  # (n,) float32 16 kHz: the window's audio only (its pieces, joined)
    start: int  # samples from the start of the request's audio
    options: AsrOptions
    language: str | None  # None: detect it from this window
    duration_s: float  # of the whole audio: times are clamped to it
    # [start, end) samples of the request's audio that ``samples`` joins (the speech, silence
    # between left out); one piece ``(start, start + len(samples))`` when nothing was left out.
    pieces: tuple[tuple[int, int], ...] = ()
    # Which request the window is of: windows of one request whose language is unknown, in one
    # step, take the language detected on the first of them (the one starting first).
    request: int = 0

    @property
    def offset_s(self) -> float:
        return self.start / SAMPLE_RATE


@dataclass(frozen=True)
class WindowResult:
    segments: tuple[Segment, ...]  # at absolute times in the request's audio
    language: str
    language_probability: float


@runtime_checkable
class WindowEngine(Protocol):
    """An engine that decodes windows of many requests in one batch."""

    supports_word_timestamps: ClassVar[bool]
    supports_language_detection: ClassVar[bool]

    @property
    def languages(self) -> frozenset[str]: ...

    @property
    def speech_windows(self) -> bool:
        """Do its windows hold speech only (VAD regions, the silence between them left out)? Then
        a stretch of a window that its decode left without words is speech it lost, decoded again
        (``lost_speech``); in a window that holds silence too, it may be silence."""
        ...

    def check(self, options: AsrOptions) -> None:
        """Raise ``InvalidParameter`` for options this engine and model cannot honour."""
        ...

    def cut(self, audio: Audio, speech_from: int | None = None) -> list[tuple[tuple[int, int], ...]]:
        """Windows in order, each the [start, end) sample pieces it joins (≤ 30 s in all). The
        audio from sample ``speech_from`` on is speech (a stream's utterance): none of it is left out."""
        ...

    def decode(self, tasks: Sequence[WindowTask]) -> list[WindowResult]:
        """One result per window; windows may belong to different requests and languages. The
        windows of one ``request`` without a language all get the language detected on its
        first window (the lowest ``start``)."""
        ...


class InterimSkipped(HarkError):
    """A stream's interim decode that newer audio of the same stream replaced before it ran
    (the stream catches it; it never reaches a client)."""

    code = "INTERIM_SKIPPED"
    status = 503


@dataclass(frozen=True)
class Replaced:
    """What the ASR replica answers, instead of raising ``InterimSkipped``, for an interim decode
    that newer audio replaced: an expected outcome, not a fault (Ray Serve logs every error a
    replica raises, with its traceback). The caller's handle turns it back into the error."""

    message: str = "Newer audio of this stream replaced this interim decode"


class SchedulerObserver(Protocol):
    """Where the scheduler reports what it does (the deployment's Prometheus metrics)."""

    def step(self, windows: int, audio_s: float, queued_windows: int) -> None: ...

    def queued(self, wait_s: float) -> None: ...

    def answered(self, audio_s: float, elapsed_s: float) -> None: ...


STREAM, FILE = 0, 1  # priorities: lower is served first

# A window whose decode left a stretch of its speech without words, this long or longer, is decoded
# again for that stretch alone (once): Whisper decodes a window in one pass and can end it early or
# skip a line, where faster-whisper's sequential loop seeks on from the last timestamp. Files and
# a stream's finals (streamed through the service, same clips, one run each: pooled WER 20.1 / 16.7
# % at 1x / 2x without, 16.9 / 16.0 % with; finals 0.83 / 0.77 s after an utterance's end).
# On bench/real_speech.py's clips a LibriVox reading's last sentence ("He might even have been
# made amiable himself.", the window's last 3 s) and a sonnet's line ("Making a famine where
# abundance lies, ...", 5 s inside a window) were lost: batch WER over those and the two test clips
# 16.96 % before, 13.60 % after, faster-whisper's loop 13.92 %.
LOST_SPEECH_S = 1.5
# Around a word's times (approximate) that count as heard. With the VAD's 0.5 s silences inside a
# region and 0.4 s padding, a pause between heard words leaves less than LOST_SPEECH_S uncovered.
_WORD_MARGIN_S = 0.3


def lost_speech(pieces: Sequence[tuple[int, int]], segments: Sequence[Segment]) -> list[tuple[tuple[int, int], ...]]:
    """The stretches of a window's ``pieces`` (samples) that no word of its ``segments`` covers,
    each at least ``LOST_SPEECH_S`` long, as pieces; none when the window has no words at all
    (silence, or an engine that does not time words)."""
    margin = int(_WORD_MARGIN_S * SAMPLE_RATE)
    covers = sorted((int(w.start * SAMPLE_RATE) - margin, int(w.end * SAMPLE_RATE) + margin)
                    for segment in segments for w in segment.words)
    if not covers:
        return []
    stretches: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    k = 0
    for start, end in pieces:
        cursor = start
        while cursor < end:
            while k < len(covers) and covers[k][1] <= cursor:
                k += 1
            if k < len(covers) and covers[k][0] <= cursor:  # in a heard word: a stretch ends
                if current:
                    stretches.append(current)
                    current = []
                cursor = covers[k][1]
                continue
            stop = min(end, covers[k][0]) if k < len(covers) else end
            current.append((cursor, stop))  # a stretch goes on across pieces until a word
            cursor = stop
    if current:
        stretches.append(current)
    return [tuple(s) for s in stretches if sum(b - a for a, b in s) >= LOST_SPEECH_S * SAMPLE_RATE]


@dataclass(eq=False)
class _Request:
    seq: int
    audio: Audio
    options: AsrOptions
    priority: int
    spans: list[tuple[tuple[int, int], ...]]  # each window's pieces
    future: Future
    clock: float  # virtual time: audio seconds served, from the scheduler's clock at arrival
    submitted: float  # time.monotonic()
    stream: str | None = None
    interim: bool = False
    next: int = 0  # first window not yet started
    # Windows to decode again, in the request's language: started before it was known, they
    # detected another one.
    redo: list[int] = field(default_factory=list)
    guessed: set[int] = field(default_factory=set)  # windows started while the language was unknown
    # Speech its windows' decodes lose is decoded again (not an interim's; speech_windows engines).
    rescue: bool = False
    # Windows added for speech another window's decode lost (``lost_speech``): not checked again.
    rescues: set[int] = field(default_factory=set)
    running: int = 0  # windows in the engine now
    results: list[WindowResult | None] = field(default_factory=list)
    language: tuple[str, float] | None = None
    done: bool = False

    @property
    def audio_in_windows(self) -> int:
        """Samples its windows hold in all (the speech, for engines that cut out silence)."""
        return sum(end - start for pieces in self.spans for start, end in pieces)

    def ready(self) -> bool:
        """Has a window that may start now. While the first window detects the request's
        language, the next ones may start beside it (a lane would idle otherwise), each detecting
        its own; one that hears another language than the first is decoded again in the first's.
        """
        return not self.done and self.waiting > 0

    @property
    def waiting(self) -> int:
        """Windows not yet started."""
        return len(self.spans) - self.next + len(self.redo)

    @property
    def upcoming(self) -> int:
        """The window to start next: one to decode again first, else the next in order."""
        return self.redo[0] if self.redo else self.next

    def take(self) -> int:
        """Mark the upcoming window started; returns it."""
        index = self.upcoming
        if self.redo:
            self.redo.pop(0)
        else:
            self.next += 1
        return index

    def settled(self, index: int, result: WindowResult) -> list[int]:
        """Record a window's result; the windows (if any) now queued: windows to decode again in
        the language now known, and for a file, the speech a kept result left without words."""
        self.results[index] = result
        if self.language is None and index == 0:
            self.language = (result.language, result.language_probability)
        if self.language is None:
            return []
        checked = {i for i in self.guessed if self.results[i] is not None}
        again = sorted(i for i in checked if self.results[i].language != self.language[0])
        self.guessed -= checked
        for i in again:
            self.results[i] = None
        self.redo += again
        kept = sorted(({index} | checked) - set(again) - self.rescues) if self.rescue else []
        return again + [added for i in kept for added in self._rescue(i)]

    def _rescue(self, index: int) -> list[int]:
        """Queue the stretches of speech window ``index``'s result left without words, as windows
        of their own; returns them."""
        added = []
        for pieces in lost_speech(self.spans[index], self.results[index].segments):
            added.append(len(self.spans))
            self.spans.append(pieces)
            self.results.append(None)
        self.rescues.update(added)
        return added


class WindowScheduler:
    def __init__(
        self,
        engine: WindowEngine,
        *,
        max_batch_windows: int = 8,
        max_batch_audio_s: float = 60.0,
        observer: SchedulerObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._max_windows = max_batch_windows
        self._max_audio = max_batch_audio_s * SAMPLE_RATE
        self._observer = observer
        self._now = clock
        self._requests: list[_Request] = []
        self._by_future: dict[int, _Request] = {}
        self._seq = itertools.count()
        self._vclock = 0.0
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._closed = False

    # --- requests ------------------------------------------------------------------------------
    def submit(self, audio: Audio, options: AsrOptions, *, stream: str | None = None, interim: bool = False) -> Future:
        """Queue one request; its future gets the ``Transcript`` or the request's own error.

        Cuts the audio (VAD) in the caller's thread, so a long file's VAD pass never holds up
        the batches of others. ``stream`` marks a live stream's decode (served first); a newer
        ``interim`` decode of the same stream replaces one that has not started (it fails with
        ``InterimSkipped``): the newest audio wins, and a stream never queues behind itself.
        """
        future: Future = Future()
        check_audio(audio)
        self._engine.check(options)
        speech_from = None if options.speech_from_s is None else int(round(options.speech_from_s * SAMPLE_RATE))
        spans = self._engine.cut(audio, speech_from)
        if not spans:  # nothing said: Whisper's own default language, with no confidence
            future.set_result(Transcript((), options.language or "en", 1.0 if options.language else 0.0, audio.duration_s))
            return future
        skipped = []
        with self._lock:
            if self._closed:
                raise RuntimeError("The scheduler is closed")
            if stream is not None and interim:
                for old in self._requests:
                    if old.stream == stream and old.interim and old.next == 0 and old.running == 0:
                        old.done = True
                        skipped.append(old)
                self._forget(skipped)
            request = _Request(
                seq=next(self._seq),
                audio=audio,
                options=options,
                priority=STREAM if stream is not None else FILE,
                spans=spans,
                future=future,
                clock=self._vclock,
                submitted=self._now(),
                stream=stream,
                interim=interim,
                results=[None] * len(spans),
                language=(options.language, 1.0) if options.language else None,
                # Not a stream's interim: it is redone with more audio anyway, and waited on live.
                rescue=not interim and self._engine.speech_windows,
            )
            self._requests.append(request)
            self._by_future[id(future)] = request
            self._wake.notify_all()
        for old in skipped:
            old.future.set_exception(InterimSkipped("Newer audio of this stream replaced this interim decode"))
        future.add_done_callback(self._cancelled)
        return future

    def cancel(self, future: Future) -> None:
        """Drop the windows of this request that have not started (its client hung up)."""
        future.cancel()
        with self._lock:
            request = self._by_future.get(id(future))
            if request is not None:
                request.done = True
                self._forget([request])

    def _cancelled(self, future: Future) -> None:
        if future.cancelled():
            self.cancel(future)

    def _forget(self, requests: list[_Request]) -> None:
        for r in requests:
            self._by_future.pop(id(r.future), None)
        self._requests = [r for r in self._requests if not r.done]

    def queued_windows(self) -> int:
        with self._lock:
            return sum(r.waiting for r in self._requests if not r.done)

    # --- the worker ----------------------------------------------------------------------------
    def run(self, *, express: bool = False) -> None:
        """Decode batches until ``close``; the replica runs this in each of its worker threads.

        ``express``: a lane that takes only urgent work (a live stream's decode, a new request
        that one step answers whole), so that neither waits for a step of a long file."""
        while True:
            with self._lock:
                while not self._closed and not any(self._eligible(r, express) for r in self._requests):
                    self._wake.wait()
                if self._closed:
                    return
            self.step(express=express)

    def start(self, lanes: int | None = None, *, express: bool | None = None) -> list[threading.Thread]:
        """Start ``lanes`` worker threads, each decoding steps, and with ``express`` one more
        for urgent work only: steps of different requests then run at once (an engine that runs
        each step on one core uses several cores so; see ``CTranslate2Engine``). By default, as
        many as the engine has (its ``lanes`` and ``express_lane``; one lane otherwise)."""
        lanes = getattr(self._engine, "lanes", 1) if lanes is None else lanes
        express = getattr(self._engine, "express_lane", False) if express is None else express
        kinds = [False] * max(1, lanes) + ([True] if express else [])
        workers = [
            threading.Thread(target=self.run, kwargs={"express": e}, name=f"asr-{'express' if e else 'step'}-{i}", daemon=True)
            for i, e in enumerate(kinds)
        ]
        for worker in workers:
            worker.start()
        return workers

    def _eligible(self, r: _Request, express: bool, starting: bool = False) -> bool:
        """May ``r`` have a window in the step being picked? The express lane takes urgent work
        only: a stream's decode, or a new request that one step answers whole (a file longer
        than a step goes to the other lanes from its first window on, or the next new request
        would find the express lane taken by it)."""
        if not r.ready():
            return False
        if not express or r.priority == STREAM or starting:
            return True
        return r.next == 0 and len(r.spans) <= self._max_windows and r.audio_in_windows <= self._max_audio

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def step(self, *, express: bool = False) -> bool:
        """Decode one batch of windows; False when no window was ready (for an ``express``
        step: no urgent one)."""
        with self._lock:
            queued = self.queued_windows()
            picked = self._pick(express)
            if not picked:
                return False
            now = self._now()
        try:
            self._run(picked, queued, now)
        except Exception as exc:  # noqa: BLE001 - a fault here must not strand these requests
            logger.exception("A decoding step failed outside the engine")
            for request, index in picked:
                self._finish(request, index, exc)
        return True

    def _run(self, picked: list[tuple[_Request, int]], queued: int, now: float) -> None:
        tasks = [
            WindowTask(
                samples=_join(r.audio.samples, r.spans[i]),
                start=r.spans[i][0][0],
                options=r.options,
                language=r.language[0] if r.language else None,
                duration_s=r.audio.duration_s,
                pieces=tuple(r.spans[i]),
                request=r.seq,
            )
            for r, i in picked
        ]
        if self._observer is not None:
            self._observer.step(len(tasks), sum(len(t.samples) for t in tasks) / SAMPLE_RATE, queued)
            for r, i in picked:
                if i == 0:
                    self._observer.queued(now - r.submitted)
        outcomes = self._decode(tasks)
        for (request, index), outcome in zip(picked, outcomes, strict=True):
            self._finish(request, index, outcome)

    def _pick(self, express: bool = False) -> list[tuple[_Request, int]]:
        """The next batch: streams first, then the request least served (virtual time), one
        window at a time, within the window and audio budgets (at least one window).

        A step that starts a request (its first window: a new arrival, a stream's decode) holds
        only requests starting in it: the windows of a file already running would make the new
        request wait for them too (on a CPU a batch costs about the sum of its windows), so a
        10 s request beside a 10-minute file is answered in about its own time. Requests that
        arrive together still share their steps."""
        picked: list[tuple[_Request, int]] = []
        starting: set[int] = set()  # requests whose first window is in this step
        audio = 0
        while len(picked) < self._max_windows:
            ready = [r for r in self._requests if self._eligible(r, express, r.seq in starting)]
            if starting:
                ready = [r for r in ready if r.seq in starting or r.next == 0]
            if not ready:
                break
            # Ties go to the request served least: a new arrival before a running file.
            r = min(ready, key=lambda r: (r.priority, r.clock, r.next, r.seq))
            if picked and not starting and r.next == 0:
                break  # a running request's step: a new one starts in a step of its own
            length = sum(end - start for start, end in r.spans[r.upcoming])
            if picked and audio + length > self._max_audio:
                break
            if r.upcoming == 0:
                starting.add(r.seq)
            elif r.language is None and r.seq not in starting:
                r.guessed.add(r.upcoming)  # its own language, beside the first window's
            picked.append((r, r.take()))
            audio += length
            r.clock += length / SAMPLE_RATE
            self._vclock = max(self._vclock, r.clock)
            r.running += 1
        return picked

    def _decode(self, tasks: list[WindowTask]) -> list[WindowResult | Exception]:
        """Each window's result, or the error it alone raised: when the batch fails, each
        window runs again on its own to find whose error it was."""
        try:
            results = self._engine.decode(tasks)
            if len(results) != len(tasks):
                raise RuntimeError(f"The engine answered {len(results)} windows for {len(tasks)}")
            return list(results)
        except Exception as exc:  # noqa: BLE001 - whose error it is, is found below
            if len(tasks) == 1:
                return [exc]
            logger.warning("A batch of %d windows failed (%r): decoding each on its own", len(tasks), exc)
        outcomes: list[WindowResult | Exception] = []
        for task in tasks:
            try:
                [result] = self._engine.decode([task])
                outcomes.append(result)
            except Exception as alone:  # noqa: BLE001 - this window's own error
                outcomes.append(alone)
        return outcomes

    def _finish(self, request: _Request, index: int, outcome: WindowResult | Exception) -> None:
        answer: Transcript | Exception | None = None
        with self._lock:
            request.running -= 1
            if request.done:  # cancelled or failed meanwhile: nothing to answer
                return
            if isinstance(outcome, Exception):
                request.done = True
                answer = outcome
            else:
                if request.settled(index, outcome):  # windows to decode again
                    self._wake.notify_all()
                if not request.waiting and request.running == 0:
                    request.done = True
                    answer = self._transcript(request)
            if request.done:
                self._forget([request])
                self._wake.notify_all()
        if answer is None:
            return
        if isinstance(answer, Transcript) and self._observer is not None:
            self._observer.answered(request.audio.duration_s, self._now() - request.submitted)
        try:
            if isinstance(answer, Exception):
                request.future.set_exception(answer)
            else:
                request.future.set_result(answer)
        except InvalidStateError:  # cancelled by its caller just now
            pass

    @staticmethod
    def _transcript(request: _Request) -> Transcript:
        language, probability = request.language or ("en", 0.0)
        return Transcript(
            # In time order: a window decoded again for lost speech comes after the others.
            segments=tuple(sorted((s for r in request.results if r is not None for s in r.segments),
                                  key=lambda s: s.start)),
            language=language,
            language_probability=probability,
            duration_s=request.audio.duration_s,
        )


def step_audio_s(settings: "AsrSettings", engine: object) -> float:
    """The audio budget of one step: the setting, else 30 s where steps run side by side on a CPU
    (a step there costs the sum of its windows: a smaller one frees its lane sooner for a new
    request), 60 s where a batch shares one forward pass."""
    if settings.max_batch_audio_s is not None:
        return settings.max_batch_audio_s
    return 30.0 if getattr(engine, "lanes", 1) > 1 else 60.0


def _join(samples: np.ndarray, pieces: Sequence[tuple[int, int]]) -> np.ndarray:
    """A window's samples as float32 (16-bit PCM is scaled here, a window at a time)."""
    if len(pieces) == 1:
        return as_float32(samples[pieces[0][0] : pieces[0][1]])  # float32: a view, no copy
    return np.concatenate([as_float32(samples[a:b]) for a, b in pieces])


class WholeAudio:
    """A ``WindowEngine`` over an engine that only takes whole audios (``AsrEngine``): each
    request is one "window" of any length, which the engine cuts itself. The scheduler's order,
    priorities and cancellation still apply; its batches are then batches of requests."""

    def __init__(self, engine: "AsrEngine") -> None:
        self._engine = engine
        self.supports_word_timestamps = engine.supports_word_timestamps
        self.supports_language_detection = engine.supports_language_detection
        self.speech_windows = False  # a request's one window is its whole audio, silence too

    @property
    def languages(self) -> frozenset[str]:
        return self._engine.languages

    def check(self, options: AsrOptions) -> None:
        self._engine.check(options)

    def cut(self, audio: Audio, speech_from: int | None = None) -> list[tuple[tuple[int, int], ...]]:
        return [((0, len(audio.samples)),)] if len(audio.samples) else []

    def decode(self, tasks: Sequence[WindowTask]) -> list[WindowResult]:
        options = [replace(t.options, language=t.language) for t in tasks]
        transcripts = self._engine.transcribe([Audio(t.samples) for t in tasks], options)
        return [WindowResult(t.segments, t.language, t.language_probability) for t in transcripts]


def window_engine(engine: "AsrEngine | WindowEngine") -> WindowEngine:
    """The engine itself where it decodes windows, else ``WholeAudio`` over it."""
    return engine if isinstance(engine, WindowEngine) else WholeAudio(engine)  # type: ignore[arg-type]
