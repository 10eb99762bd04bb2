"""One transcription of decoded audio: ASR, diarization beside it, the merge, the response body.

``TranscriptionFlow`` is the one place this is written. It talks to ASR and diarization through two
small Protocols, so the same flow runs over Ray Serve handles (the ingress and the job runner,
adapters in ``deployments.handles``) and over objects in this process (the CLI and Ray Data batch:
``LocalRecognizer`` and ``LocalSpeakers`` below).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from pipeline.asr.base import AsrEngine, Capabilities, transcribe_each
from pipeline.core.errors import InvalidParameter
from pipeline.core.settings import DiarizationSettings
from pipeline.core.types import AsrOptions, Audio, Diarization, Transcript
from pipeline.diarization.base import DiarizationOptions, Diarizer
from pipeline.transcription import grouping
from pipeline.transcription.merge import assign_word_speakers
from pipeline.transcription.render import render
from pipeline.transcription.schemas import ListenParams

logger = logging.getLogger(__name__)


class Recognizer(Protocol):
    """ASR for one audio at a time (batching, if any, is the implementation's business)."""

    async def capabilities(self) -> Capabilities: ...

    async def transcribe(self, audio: Audio, options: AsrOptions) -> Transcript: ...


class Speakers(Protocol):
    """Diarization: ``check`` refuses (``INVALID_PARAMETER``, param ``diarize``) when unavailable."""

    async def check(self) -> None: ...

    async def diarize(self, audio: Audio, num_speakers: int | None) -> Diarization: ...


class Meter(Protocol):
    """The caller's daily audio quota, as reservations: ``reserve`` the decoded duration before any
    work (``RATE_LIMITED`` if it, with every other reservation of the key, would exceed the quota),
    then ``settle`` (charge) after the work or ``cancel`` when it failed. A stream ``extend``s its
    reservation as audio arrives."""

    async def reserve(self, duration_s: float) -> str: ...

    async def extend(self, reservation: str, duration_s: float) -> None: ...

    async def settle(self, reservation: str, duration_s: float) -> None: ...

    async def cancel(self, reservation: str) -> None: ...


@dataclass(frozen=True)
class TranscriptionResult:
    transcript: Transcript
    body: dict  # the /v1/listen response body, as JSON-ready values
    word_speakers: tuple[str, ...] | None = None  # one label per transcript word, when diarized


class TranscriptionFlow:
    def __init__(self, recognizer: Recognizer, speakers: Speakers) -> None:
        self._recognizer, self._speakers = recognizer, speakers
        self._capabilities: Capabilities | None = None
        self._capabilities_lock = asyncio.Lock()

    @property
    def recognizer(self) -> Recognizer:
        return self._recognizer

    async def capabilities(self) -> Capabilities:
        """The ASR engine's capabilities, asked once (they are fixed for the engine's life)."""
        if self._capabilities is None:
            # One question, not one per waiting request: a burst of first requests must not
            # fill the ASR queue with capability questions.
            async with self._capabilities_lock:
                if self._capabilities is None:
                    self._capabilities = await self._recognizer.capabilities()
        return self._capabilities

    async def check(self, params: ListenParams, *, task: str = "transcribe") -> None:
        """Refuse up front what cannot be served (before any audio is fetched)."""
        caps = await self.capabilities()
        caps.refuse_unsupported(language=params.language, timestamps=params.timestamps or params.utterances or params.paragraphs,
                                diarize=params.diarize, task=task)
        if params.diarize:
            await self._speakers.check()

    async def run(self, audio: Audio, params: ListenParams, *, request_id: str,
                  meter: Meter | None = None, asr_options: AsrOptions | None = None) -> TranscriptionResult:
        """``asr_options``: what the engine is asked, where a caller says more than ``params``
        (the OpenAI routes: prompt, temperature, translation); else ``params.asr_options()``."""
        # The quota on the decoded duration, reserved before any work: a refusal costs nothing.
        reservation = await meter.reserve(audio.duration_s) if meter is not None else None
        try:
            # No retry anywhere here: a transcription runs once.
            asr = self._recognizer.transcribe(audio, asr_options or params.asr_options())
            word_speakers = None
            if params.diarize:
                # Diarization runs beside ASR on the same decoded samples: no second fetch or decode.
                transcript, diarization = await asyncio.gather(asr, self._speakers.diarize(audio, params.num_speakers))
                word_speakers = await asyncio.to_thread(assign_word_speakers, transcript.words, diarization.turns)
            else:
                transcript = await asr
        except BaseException:
            if reservation is not None:
                # Failed or cancelled: nothing is charged. Shielded, so that a cancellation of
                # this request still gives the reservation back.
                await asyncio.shield(meter.cancel(reservation))
            raise
        if reservation is not None:
            await meter.settle(reservation, transcript.duration_s)
        # Rendering a long transcript is CPU work: off the event loop (the ingress's is shared).
        body = await asyncio.to_thread(lambda: render(
            transcript,
            request_id=request_id,
            punctuate=params.punctuate,
            timestamps=params.timestamps,
            word_speakers=word_speakers,
            utterances=grouping.utterances(transcript.words, word_speakers, utt_split_s=params.utt_split,
                                           punctuate=params.punctuate) if params.utterances else None,
            paragraphs=grouping.paragraphs(transcript.words, word_speakers, punctuate=params.punctuate)
            if params.paragraphs else None,
        ).to_json())
        return TranscriptionResult(transcript, body, word_speakers)


class LocalRecognizer:
    """An engine in this process as a ``Recognizer``; it decodes in a worker thread."""

    def __init__(self, engine: AsrEngine, name: str) -> None:
        self._engine, self._name = engine, name

    async def capabilities(self) -> Capabilities:
        return Capabilities.of(self._engine, self._name)

    async def transcribe(self, audio: Audio, options: AsrOptions) -> Transcript:
        self._engine.check(options)
        # The same checks as the ASR deployment's batches (NaN samples refused, not decoded).
        [outcome] = await asyncio.to_thread(transcribe_each, self._engine, [audio], [options])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class LocalSpeakers:
    """The configured diarizer in this process, built on first use (or at once with ``eager``).

    When its packages are not installed (``hark-asr[diarize]``), transcription still works and
    diarize requests are refused with a clear ``INVALID_PARAMETER``.
    """

    def __init__(self, settings: DiarizationSettings, *, eager: bool = False) -> None:
        self._settings = settings
        self._diarizer: Diarizer | None = None
        self.unavailable: str | None = None
        if eager:
            self._build()

    def _build(self) -> Diarizer | None:
        if self._diarizer is None and self.unavailable is None:
            from pipeline.diarization.factory import build_diarizer

            try:
                self._diarizer = build_diarizer(self._settings)
            except (ImportError, RuntimeError) as exc:
                self.unavailable = f"Speaker diarization is not installed on this server ({exc})"
                logger.warning(self.unavailable)
        return self._diarizer

    async def check(self) -> None:
        if self._build() is None:
            raise InvalidParameter(self.unavailable or "Speaker diarization is unavailable", param="diarize")

    async def diarize(self, audio: Audio, num_speakers: int | None) -> Diarization:
        await self.check()
        options = DiarizationOptions(num_speakers=num_speakers, max_speakers=self._settings.max_speakers)
        return await asyncio.to_thread(self._diarizer.diarize, audio, options)


def local_flow(engine: AsrEngine, name: str, diarization: DiarizationSettings) -> TranscriptionFlow:
    """The flow over an engine and a (lazily built) diarizer in this process."""
    return TranscriptionFlow(LocalRecognizer(engine, name), LocalSpeakers(diarization))
