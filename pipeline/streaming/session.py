"""Live transcription of an audio stream: VAD-driven utterances, interim results that settle.

The session keeps the audio of the current utterance. Every ``interim_every_s`` of new speech it
re-decodes the utterance; words on which two successive hypotheses agree (local agreement), and
that are not in the last ``unstable_tail_s`` of audio, become final and never change. When the
speaker pauses for ``endpointing_ms`` (Silero VAD; ``fragment_endpointing_ms`` after a fragment of
speech), the whole utterance is decoded once more and what was not yet final is finalised with
``speech_final``; that decode starts ``early_final_ms`` into the pause (what follows the speech is
silence) and is used if the speaker said nothing more. Each
decode starts with the stream's previous audio (up to ``context_s`` in all; an utterance's first
interims, ``interim_context_s``) and keeps only the words of the utterance (and those just before
it that lead into it and no final has): Whisper garbles a short utterance heard alone. A session
that is behind (audio waiting) skips interims and finalises the utterances that ended meanwhile
together, once it has caught up, up to the last pause that ended one (the speech after it goes on
as the next utterance). Decoding goes through an injected
coroutine, so the service uses the same ASR deployment as batch requests and tests can fake it.
The VAD runs in a worker thread (``executor``; the loop's default one when None), never on the
event loop that serves every stream of the process.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.transcription.render import api_words, ends_sentence, strip_punctuation
from pipeline.asr.scheduler import InterimSkipped
from pipeline.audio.vad import silero_speech
from pipeline.core.types import SAMPLE_RATE, AsrOptions, Audio, Transcript, Word

Transcribe = Callable[[Audio, AsrOptions], Awaitable[Transcript]]
# (samples) -> list of (start, end) sample indices of speech
Vad = Callable[[np.ndarray], list[tuple[int, int]]]


# Short silences and little padding: an utterance must end within endpointing_ms of silence.
silero_vad = silero_speech(min_silence_duration_ms=100, speech_pad_ms=30, min_speech_duration_ms=100)
VAD_WINDOW = SAMPLE_RATE  # samples the VAD sees at least: a pause of up to 1 s shows in it
VAD_CONTEXT = SAMPLE_RATE // 2  # samples already checked that go with new ones, to settle the VAD
PRE_ROLL = SAMPLE_RATE // 2  # silence kept before speech


@dataclass(frozen=True)
class StreamOptions:
    language: str | None = None
    punctuate: bool = True
    interim_results: bool = True
    endpointing_ms: int = 300  # silence that ends an utterance
    interim_every_s: float = 1.5
    # The final's decode starts after this much silence (at most half of endpointing_ms), and the
    # endpoint uses it if no speech came after; it was half of endpointing_ms. Silero's VAD ends
    # speech after 100 ms of silence (``silero_vad``): as soon as the session can know that speech
    # stopped. With interim_context_s, in process on the three-voice conversation
    # (bench/bench_stream.py, 2-core AVX2 machine, the old and new code side by side, twice): the
    # final came 1.66 / 1.47 s after the end of an utterance (median) before, 1.19 / 1.18 s after.
    # Through the service's WebSocket (one run each) 1.29 s before, 1.37 s after: no gain there.
    early_final_ms: int = 100
    # Words ending this close to the live edge are not final yet, even when two hypotheses agree:
    # Whisper hears a phrase cut at the edge as other words, and twice alike ("Neither did I"
    # became "I need" in two interims of pyannote's sample, committed, and lost).
    unstable_tail_s: float = 3.0
    max_utterance_s: float = 25.0  # an utterance is cut (finalised) at this length
    vad_every_s: float = 0.1
    final_beam_size: int | None = 1  # None: the engine's width (slower on CPUs, a little more accurate)
    # Each decode starts with the stream's previous audio, so that it covers this much at least:
    # Whisper drops and garbles words of a short utterance heard alone ("Ever failed" became
    # "Everfair old"); only words after the utterance's start are kept. 0: the utterance alone.
    # The committed text as Whisper's previous-text prompt instead (the last 12 final words, no
    # audio context; the decoder reads a prompt in one pass) was tried and is worse on every count:
    # in process, on the conversation and sample.wav, the old and new one after the other (2-core
    # AVX-512 machine), finals 0.89 -> 1.61 s after the end of an utterance (median; final decodes
    # 0.76 -> 1.47 s, for 10 -> 3.5 s of audio: the prompted decodes ran longer), first result
    # 1.21 -> 1.76 s, streamed WER on sample.wav 19.8 / 18.5 % -> 30.9 / 28.8 % (1x / 2x).
    # The final words said in the context given to the decoder as its prefix (CTranslate2 takes
    # them as already decoded and goes on after them; the audio cut to start with the first of
    # them) was tried too: faster (in process, on the conversation, one run: finals 0.82 -> 0.70 s
    # after the end of an utterance, first result 1.20 -> 0.77 s) but less accurate. Where the
    # final words differ from the audio ("reporting" for "recording"), Whisper hears that audio
    # again after them ("The reporting environment is also quite different. The recording
    # environment is also quite different.") or skips what follows; MFA's cold corpora streamed
    # at 25.4 / 28.6 % and 31.1 / 27.9 % (1x / 2x) against 20.6 / 12.7 % and 24.6 / 24.6 %.
    context_s: float = 10.0
    # The same (in all) for an interim decode of an utterance shorter than unstable_tail_s, none
    # of whose words can become final yet (the next hypothesis, which they must agree with, hears
    # context_s). A decode's time grows with the tokens it generates (a decoder step each: ~11 ms
    # for Whisper base on one core of a 2-core AVX2 machine), and with context_s an utterance's
    # first interim re-decoded some 30 tokens of context to show its first word or two. In
    # process, on the three-voice conversation, side by side as above (with early_final_ms):
    # interims 1.07 / 0.96 -> 0.52 / 0.55 s (median), the first result 2.48 / 2.07 -> 1.52 / 1.51 s
    # after speech started (median); streamed WER on sample.wav unchanged
    # (17.3 / 18.9 % at 1x / 2x before, 18.1 / 19.8 % after, three streams each). Short context on
    # every interim (commits from two such hypotheses) cost 6 points of WER there.
    interim_context_s: float = 2.0
    # The first interim of an utterance comes after this much of its speech (not counting the
    # silence kept before it), again every first_interim_s until one hears words, then every
    # interim_every_s. In process, on the three-voice conversation (bench/bench_stream.py), 1.0 s
    # gave a first result 1.63 s after speech started (median), 0.6 s 1.27 s, 0.4 s 1.22 s.
    first_interim_s: float = 0.5
    # An utterance with less than fragment_s of speech (none of it final) ends only after
    # fragment_endpointing_ms of silence (if that is longer than endpointing_ms); 0: as any other.
    # Such a fragment is mostly a phrase cut off by a hesitation ("than the [0.4 s] acoustic
    # corpus"), and Whisper hears it poorly without what follows ("to me"). Held, it is decoded with
    # the speech after it, if the speaker goes on within that pause. The server sets it to 0 when
    # the client gives ``endpointing``. In process, on 8 real clips of 531 words (the MFA corpora,
    # a sonnet, LibriVox, a podcast; bench/bench_stream.py --clips, one run each, one after the
    # other): streamed WER +2.4 / +1.7 points over batch (1x / 2x) before, +0.8 / +1.5 with it; on
    # the three-voice conversation (turns of 1-5 s) the final came 0.77 s before and 0.82 s with
    # it after the end of an utterance (median), the first result 1.24 and 1.22 s after its start.
    fragment_s: float = 1.0
    fragment_endpointing_ms: int = 800


@dataclass
class _EarlyFinal:
    """A final decode started before the endpoint, while the pause is still short."""

    task: asyncio.Task  # the Transcript
    origin_s: float  # absolute time of its audio's start
    offset_s: float  # the utterance's start then
    speech_end: int  # where the speech ended then (buffer index)

    def holds_all_speech(self, offset_s: float, speech_end: int) -> bool:
        """Did it decode all the speech there is now (no speech came after it started)?"""
        return offset_s == self.offset_s and speech_end <= self.speech_end + _SPEECH_END_SLACK


# The VAD's end of speech may move by a few frames as more audio comes; that is not new speech.
_SPEECH_END_SLACK = SAMPLE_RATE // 20


@dataclass
class StreamingSession:
    transcribe: Transcribe
    options: StreamOptions = field(default_factory=StreamOptions)
    vad: Vad = silero_vad
    executor: Executor | None = None  # where the VAD runs; None: the event loop's default executor
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # the utterance so far
    past: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # audio just before buffer[0]
    offset_s: float = 0.0  # absolute time of buffer[0]
    received_s: float = 0.0
    committed: list[Word] = field(default_factory=list)  # final words of this utterance (absolute)
    previous: list[Word] | None = None  # last hypothesis beyond the committed words
    _final_end_s: float = 0.0  # absolute end of the last final word sent: where a next opening mark sits
    _history: list[Word] = field(default_factory=list)  # the last final words of earlier utterances
    speech_seen: bool = False
    trailing_silence_s: float = 0.0
    _since_vad: int = 0
    _decoded_len: int = 0
    _vad_checked: int = 0  # buffer[:_vad_checked] has been through the VAD
    _speech_end: int = 0  # buffer index where the last speech seen ends
    _speech_start: int = 0  # buffer index where the utterance's speech starts
    # Buffer index where an utterance ended while the session was behind: it is finalised there
    # once the session catches up, not together with the speech that came after it.
    _ended_at: int | None = None
    # The stream's language: given, or detected by its first final decode that is sure enough of
    # it (``_LANGUAGE_LOCK_PROBABILITY``), and then held; until then every decode detects its own.
    language: str | None = None
    _heard_language: str | None = None  # the language of the last decode with words
    # Names this stream's decodes to the ASR scheduler: served before files, a newer interim
    # replacing one not yet started.
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # feed and finish run one at a time, in call order: each awaits the VAD and the recogniser.
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    _early: _EarlyFinal | None = None

    def __post_init__(self) -> None:
        self.language = self.options.language

    # ---- input ----------------------------------------------------------------------------------

    async def feed(self, samples: np.ndarray, *, behind: bool = False) -> list[dict[str, Any]]:
        """Add 16 kHz mono audio; returns the Results messages it produced.

        ``behind``: more of the stream's audio has arrived already and waits to be fed. Then no
        interim runs (it would describe audio already outdated: the newest audio wins), and an
        utterance that ends waits to be finalised with what follows until the session has caught
        up (or the utterance reaches ``max_utterance_s``): one decode for several utterances, so
        a stream that fell behind catches up instead of falling further behind.
        """
        async with self._turn:
            return await self._feed(samples, behind)

    async def finish(self) -> list[dict[str, Any]]:
        """The stream ended: finalise whatever is pending."""
        async with self._turn:
            if self.speech_seen:
                return await self._finalise(speech_final=True)
            self._drop_early()
            return []

    def close(self) -> None:
        """The stream ended without ``finish`` (the client went away, an error): a final decode
        started early is not needed."""
        self._drop_early()

    async def _feed(self, samples: np.ndarray, behind: bool = False) -> list[dict[str, Any]]:
        self.buffer = np.concatenate([self.buffer, samples.astype(np.float32, copy=False)])
        self.received_s += len(samples) / SAMPLE_RATE
        self._since_vad += len(samples)
        if self._since_vad < self.options.vad_every_s * SAMPLE_RATE:
            return []
        self._since_vad = 0
        await self._update_vad()
        if self._early is not None and not self._early.holds_all_speech(self.offset_s, self._speech_end):
            self._drop_early()  # the speaker went on: that decode missed what came after
        if not self.speech_seen:
            # Nothing said yet (and all of it checked): keep only the last half second, so
            # silence costs no memory.
            if len(self.buffer) > 2 * PRE_ROLL:
                self._drop_front(len(self.buffer) - PRE_ROLL)
            return []
        endpointing_ms = self._endpointing_ms()
        ended = self.trailing_silence_s * 1000 >= endpointing_ms
        if len(self.buffer) >= self.options.max_utterance_s * SAMPLE_RATE:
            return await self._finalise(speech_final=ended)
        if ended and not behind:
            return await self._finalise(speech_final=True)
        if behind:
            if ended and (self._ended_at is None or self._ended_at <= self._speech_end):
                # The pause reached the endpoint: the utterance ends here, whatever follows.
                endpoint = self._speech_end + endpointing_ms * SAMPLE_RATE // 1000
                self._ended_at = min(len(self.buffer), endpoint)
            return []
        if self._ended_at is not None:
            return await self._finalise_ended()
        if self.trailing_silence_s * 1000 >= min(self.options.early_final_ms, self.options.endpointing_ms / 2):
            # The utterance is likely ending: no interim to delay its final, whose decode starts
            # now (the endpoint uses it if the speaker says nothing more).
            if self._early is None:
                await self._start_early_final()
            return []
        heard = bool(self.committed or self.previous)
        due = self.options.interim_every_s if heard else self.options.first_interim_s
        if len(self.buffer) - max(self._decoded_len, self._speech_start) >= due * SAMPLE_RATE:
            return await self._interim()
        return []

    def _endpointing_ms(self) -> int:
        """The silence that ends the utterance so far: longer after a fragment."""
        options = self.options
        if not self.committed and self._speech_end - self._speech_start < options.fragment_s * SAMPLE_RATE:
            return max(options.endpointing_ms, options.fragment_endpointing_ms)
        return options.endpointing_ms

    async def _update_vad(self) -> None:
        # Everything new since the last check, with VAD_CONTEXT before it (a window of at least
        # a second, as a 0.1 s frame gets): a frame may hold seconds of audio, and none of it may
        # go unchecked.
        start = max(0, min(len(self.buffer) - VAD_WINDOW, self._vad_checked - VAD_CONTEXT))
        window = self.buffer[start:]
        self._vad_checked = len(self.buffer)
        regions = []
        if len(window) >= 512:
            # The window is a view of this buffer, which is replaced, never written, as audio comes.
            regions = await asyncio.get_running_loop().run_in_executor(self.executor, self.vad, window)
        if regions:
            if not self.speech_seen:
                # The utterance starts with its speech: drop what silence came before it.
                drop = max(0, start + regions[0][0] - PRE_ROLL)
                self._drop_front(drop)
                start -= drop
                self._speech_start = start + regions[0][0]
            self.speech_seen = True
            self._speech_end = start + regions[-1][1]
        if self.speech_seen:
            self.trailing_silence_s = (len(self.buffer) - self._speech_end) / SAMPLE_RATE

    def _drop_front(self, n: int, offset_s: float | None = None) -> None:
        """Forget the first ``n`` samples of the buffer; ``offset_s`` is the new buffer start when
        the caller knows it better than by counting samples."""
        self._remember(self.buffer[:n])
        self.buffer = self.buffer[n:]
        self.offset_s = self.offset_s + n / SAMPLE_RATE if offset_s is None else offset_s
        self._decoded_len = max(0, self._decoded_len - n)
        self._vad_checked = max(0, self._vad_checked - n)
        self._speech_end -= n
        self._speech_start = max(0, self._speech_start - n)
        if self._ended_at is not None:
            self._ended_at = max(0, self._ended_at - n)

    def _remember(self, samples: np.ndarray) -> None:
        """Keep the last ``context_s`` of the audio that leaves the buffer, as left context."""
        keep = int(self.options.context_s * SAMPLE_RATE)
        if keep <= 0 or not len(samples):
            return
        if len(samples) >= keep:
            self.past = samples[-keep:].copy()
        else:
            self.past = np.concatenate([self.past[max(0, len(self.past) - (keep - len(samples))):], samples])

    # ---- decoding -------------------------------------------------------------------------------

    def _request(self, beam_size: int | None, interim: bool) -> tuple[Audio, AsrOptions, float]:
        """The audio and options of a decode of the utterance so far, and the absolute time of
        the audio's start."""
        self._decoded_len = len(self.buffer)
        # Left context: the stream's previous audio, up to context_s in all.
        unsettled = interim and len(self.buffer) < self.options.unstable_tail_s * SAMPLE_RATE  # no word final yet
        context_s = self.options.interim_context_s if unsettled else self.options.context_s
        lead = min(len(self.past), max(0, int(context_s * SAMPLE_RATE) - len(self.buffer)))
        samples = np.concatenate([self.past[len(self.past) - lead:], self.buffer]) if lead else self.buffer.copy()
        origin_s = self.offset_s - lead / SAMPLE_RATE  # absolute time of samples[0]
        duration = len(samples) / SAMPLE_RATE
        # Latency first: a token budget far above speech rates (~4 tokens/s) that stops a looping
        # decoder early, and no prompt (on short chunks it invites loops). Interims decode at one
        # temperature; finals may fall back to hotter decodes when the greedy one is degenerate
        # ("Well, well, well, ..."): rare, and a final is what stays.
        opts = AsrOptions(
            language=self.language, word_timestamps=True, beam_size=beam_size,
            temperature_fallback=not interim, max_new_tokens=int(20 + 10 * duration),
            stream=self.stream_id, interim=interim, speech_from_s=lead / SAMPLE_RATE,
        )
        return Audio(samples), opts, origin_s

    async def _decode(self, beam_size: int | None, interim: bool = False) -> list[Word]:
        audio, opts, origin_s = self._request(beam_size, interim)
        return self._words(await self.transcribe(audio, opts), origin_s, final=not interim)

    @property
    def language_now(self) -> str | None:
        """The stream's language, or before it is known, what the last decode with words heard."""
        return self.language or self._heard_language

    def _words(self, transcript: Transcript, origin_s: float, *, final: bool) -> list[Word]:
        """The words of a decode that are new in this utterance, at absolute times."""
        if self.language is None and transcript.words:
            self._heard_language = transcript.language
            # One language for the whole stream, from a whole utterance: an interim hears its
            # first half second. Whisper base on espeak's French sentence: its first 0.5-1 s
            # detected as Chinese (0.46-0.50), the whole sentence as French (0.53-0.57); a stream
            # that kept its first interim's language came out in Japanese to the end.
            if final and transcript.language_probability >= _LANGUAGE_LOCK_PROBABILITY:
                self.language = transcript.language
        committed_end = self.committed[-1].end if self.committed else -1.0
        # A word timed at the very end of the audio was not heard in it: on a decode that ends
        # soon after the speech (a stream's window is not padded to 30 s), Whisper can run on past
        # the audio, repeating what it heard, with every such word clamped to the end ("... after
        # that. I have the numbers from last quarter ready ...", each at 9.98 s of 10 s).
        heard_before = transcript.duration_s - _PAST_THE_END_S
        words = [Word(w.text, w.start + origin_s, w.end + origin_s, w.probability)
                 for w in transcript.words if w.start < heard_before]
        # Only what lies in this utterance (not in the context before it; a word's middle
        # decides, Whisper's word times are approximate) and after the final words: those
        # never change. Whisper often times an utterance's first word early, into the silence
        # before it, and the utterance may start right after the last one's endpoint: its middle
        # may lie up to _EARLY_START_S before the utterance, if it starts after the last final
        # word ended (one timed from where that word starts is that word heard again, maybe as
        # another: "sick quarter." final, then "corpus.@2.94-3.40" after "quarter.@2.94-3.16").
        # A word of the utterance starts no earlier than the last final word ended: results never
        # overlap.
        # The words that lead into the utterance's first one from before it may be kept too
        # (``_lead_in``).
        after = self._final_end_s
        start = max(self.offset_s - _EARLY_START_S, min(self.offset_s, after))
        inside = [i for i, w in enumerate(words) if w.start >= committed_end - 0.02 and _middle(w) >= start
                  and (_middle(w) >= self.offset_s or w.start >= after - _RETIMED_S)]
        kept = [words[i] for i in inside]
        if inside and not self.committed:
            kept = self._lead_in(words, inside[0]) + kept
        fresh = [w if w.start >= after else Word(w.text, after, max(w.end, after), w.probability) for w in kept]
        # A re-decode can repeat the last final words with shifted times: drop such an overlap.
        if self.committed:
            return _after_repeat(fresh, self.committed[-5:])
        return _drop_repeat(fresh, self._history)

    def _lead_in(self, words: list[Word], first: int) -> list[Word]:
        """The words heard just before ``words[first]``, the utterance's first, in the stream's
        audio between the last final word and the utterance: the phrase the utterance goes on.

        The VAD can miss an utterance's quiet first words ("than the" in "... sounds a lot
        different. [pause] than the acoustic corpus"), or the last utterance's final can lose the
        words cut at its end; either way they lie before the utterance's audio, in the left
        context, and no final has them. A decode with context hears them: they are kept when
        each runs on into the next (at most ``_LEAD_IN_GAP_S`` apart), starts after the last final
        word ended and lies mostly after it, and they are not the stream's last final words heard
        again. (Through the service, MFA's cold corpus: "... probably good. All right." final, "All"
        at 23.75-23.95 s, "right." at 23.95-24.03; then a decode heard "Alright,@23.94-24.04
        thanks.@24.30": "Alright," is those words heard again as one, though it starts within
        ``_RETIMED_S`` of their end.)"""
        after, j = self._final_end_s, first
        while (j > 0 and words[j - 1].start >= after - _RETIMED_S and _middle(words[j - 1]) >= after
               and words[j].start - words[j - 1].end <= _LEAD_IN_GAP_S):
            j -= 1
        return _after_repeat(words[j:first], self._history)

    async def _interim(self) -> list[dict[str, Any]]:
        try:
            hypothesis = await self._decode(beam_size=1, interim=True)
        except InterimSkipped:  # newer audio of this stream is being decoded instead
            return []
        events = []
        live_edge = self.offset_s + len(self.buffer) / SAMPLE_RATE
        agreed: list[Word] = []
        if self.previous is not None:
            for old, new in zip(self.previous, hypothesis):
                if _norm(old.text) != _norm(new.text) or new.end > live_edge - self.options.unstable_tail_s:
                    break
                agreed.append(new)
        if agreed:
            self.committed += agreed
            events.append(self._results(agreed, is_final=True, speech_final=False))
            # Final audio need not be decoded again, but Whisper drops words when a chunk starts
            # mid-phrase: restart the buffer only after a final word that ends a sentence (or
            # when the buffer grows long), never in the middle of one.
            cut_at = next((w for w in reversed(agreed) if ends_sentence(w.text)), None)
            if cut_at is None and len(self.buffer) / SAMPLE_RATE > self.options.max_utterance_s / 2:
                cut_at = agreed[-1]
            if cut_at is not None:
                self._drop_front(int(round((cut_at.end - self.offset_s) * SAMPLE_RATE)), offset_s=cut_at.end)
        rest = hypothesis[len(agreed):]
        self.previous = rest
        if rest and self.options.interim_results:
            events.append(self._results(rest, is_final=False, speech_final=False))
        return events

    async def _start_early_final(self) -> None:
        audio, opts, origin_s = self._request(self.options.final_beam_size, interim=False)
        task = asyncio.ensure_future(self.transcribe(audio, opts))
        task.add_done_callback(_retrieve)
        self._early = _EarlyFinal(task, origin_s, self.offset_s, self._speech_end)
        await asyncio.sleep(0)  # the request goes out now, not at this session's next await

    def _drop_early(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            early.task.cancel()  # its windows not yet started leave the ASR queue

    async def _finalise(self, speech_final: bool) -> list[dict[str, Any]]:
        early = self._early
        if early is not None and early.holds_all_speech(self.offset_s, self._speech_end):
            self._early = None
            words = self._words(await early.task, early.origin_s, final=True)
        else:
            self._drop_early()
            words = await self._decode(beam_size=self.options.final_beam_size)
        end = self.offset_s + len(self.buffer) / SAMPLE_RATE
        events = [self._results(words, is_final=True, speech_final=speech_final, end=end)]
        self._history = (self._history + self.committed + words)[-_HISTORY_WORDS:]
        self.offset_s = end
        self._remember(self.buffer)
        self.buffer = np.zeros(0, np.float32)
        self.committed, self.previous = [], None
        self.speech_seen, self.trailing_silence_s, self._decoded_len = False, 0.0, 0
        self._vad_checked = self._speech_end = self._speech_start = 0
        self._ended_at = None
        return events

    async def _finalise_ended(self) -> list[dict[str, Any]]:
        """Finalise what was said up to the pause in which an utterance ended while the session was
        behind (one decode, however many utterances ended in that audio); the speech after it
        starts the next utterance."""
        cut, self._ended_at = self._ended_at, None
        self._drop_early()
        rest, speech_end = self.buffer[cut:], self._speech_end - cut
        self.buffer = self.buffer[:cut]
        events = await self._finalise(speech_final=True)
        self.buffer, self.speech_seen = rest, True
        self._vad_checked, self._speech_end = len(rest), max(0, speech_end)
        self.trailing_silence_s = (len(rest) - self._speech_end) / SAMPLE_RATE
        return events

    def _results(self, words: list[Word], *, is_final: bool, speech_final: bool, end: float | None = None) -> dict[str, Any]:
        start = words[0].start if words else self.offset_s
        stop = end if end is not None and not words else (words[-1].end if words else start)
        text = "".join(w.text for w in words).strip()
        message = {
            "type": "Results",
            "is_final": is_final,
            "speech_final": speech_final,
            "start": round(start, 3),
            "duration": round(max(0.0, stop - start), 3),
            "text": text if self.options.punctuate else strip_punctuation(text),
            "words": [
                w.model_dump(exclude_none=True)
                for w in api_words(words, self.options.punctuate, previous_end_s=self._final_end_s)
            ],
            "language": self.language_now,
        }
        if is_final and words:
            self._final_end_s = words[-1].end
        return message


def _retrieve(task: asyncio.Task) -> None:
    """Mark a dropped early decode's error as seen: it was not needed (the one that is needed is
    awaited, and raises there)."""
    if not task.cancelled():
        task.exception()


_HISTORY_WORDS = 12
# How far before its utterance's start Whisper may time the middle of the utterance's first word
# (Beckett's "Fail better." after "Fail again.": "Fail" at 7.97-8.31 s, the utterance from 8.20 s).
_EARLY_START_S = 0.3
# A word that starts this close to the end of a decode's audio is one Whisper added past it.
_PAST_THE_END_S = 0.05
_MIN_REPEAT = 3
# Two decodes of the same audio time a word's start this far apart (a word and the next share a
# boundary: "words@16.08-16.58 and@16.58-18.54" after a final "words" that ended at 16.61 s).
_RETIMED_S = 0.1
# The words that lead into an utterance from before it follow one another within this (Whisper's
# times; the MFA cold corpus: "than@6.08-6.42 the@6.42-6.90 acoustic@7.72", a hesitation).
_LEAD_IN_GAP_S = 1.0
# A final's detected language holds for the stream from this probability (faster-whisper's
# ``language_detection_threshold``); below it, the next decodes detect again, with more audio.
_LANGUAGE_LOCK_PROBABILITY = 0.5


def _after_repeat(fresh: list[Word], said: list[Word]) -> list[Word]:
    """``fresh`` without its longest start that repeats the end of ``said``."""
    old = [_norm(w.text) for w in said]
    for k in range(min(len(old), len(fresh)), 0, -1):
        if old[-k:] == [_norm(w.text) for w in fresh[:k]]:
            return fresh[k:]
    return fresh


def _drop_repeat(fresh: list[Word], history: list[Word]) -> list[Word]:
    """``fresh`` without a start that repeats the end of the earlier utterances' final words.

    A decode starts with the stream's previous audio as context, and Whisper can hear the
    context's last words again and time them after it ("... New Jersey now." then "I don't hear
    that New Jersey" once more, as a new utterance). A repeat is at least ``_MIN_REPEAT`` words
    equal to a run of the history that ends at its last word or up to two words before it, in
    the middle of a sentence (the repeat cut short); fewer words may be a real repeat ("Hello?
    Hello?") and are kept, and so is a sentence said again after other words (pyannote's sample:
    "... originally from Chicago. Oh, I'm...", then "originally from Chicago also.")."""
    old = [_norm(w.text) for w in history]
    new = [_norm(w.text) for w in fresh]
    for k in range(min(len(old), len(new)), _MIN_REPEAT - 1, -1):
        for end in range(len(old), max(k, len(old) - 2) - 1, -1):
            if old[end - k : end] == new[:k] and (end == len(old) or not ends_sentence(history[end - 1].text)):
                return fresh[k:]
    return fresh


def _norm(text: str) -> str:
    return strip_punctuation(text)


def _middle(word: Word) -> float:
    return (word.start + word.end) / 2
