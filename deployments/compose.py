"""What the ingress and the job runner both do with decoded audio: ASR, diarization beside it,
the merge, the audio-hours charge, and the response body."""

from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

from pipeline.asr.base import Capabilities
from pipeline.transcription.render import render
from pipeline.transcription.merge import assign_word_speakers
from pipeline.transcription.schemas import ListenParams
from pipeline.core.types import Audio, Transcript


class Composer:
    def __init__(self, asr: DeploymentHandle, diarization: DeploymentHandle, accounting: DeploymentHandle) -> None:
        self._asr, self._diarization, self._accounting = asr, diarization, accounting
        self._capabilities: Capabilities | None = None
        self._capabilities_lock = asyncio.Lock()

    async def capabilities(self) -> Capabilities:
        """The ASR engine's capabilities, asked once (they are fixed for a deployment's life)."""
        if self._capabilities is None:
            # One call per ingress replica, not one per waiting request: a burst of first
            # requests must not fill the ASR queue with capability questions.
            async with self._capabilities_lock:
                if self._capabilities is None:
                    self._capabilities = await self._asr.capabilities.remote()
        return self._capabilities

    async def check(self, params: ListenParams) -> None:
        """Refuse up front what cannot be served (before any audio is fetched)."""
        caps = await self.capabilities()
        caps.refuse_unsupported(language=params.language, timestamps=params.timestamps, diarize=params.diarize)
        if params.diarize:
            await self._diarization.check.remote()

    async def transcribe(self, audio: Audio, params: ListenParams, key_id: str, request_id: str) -> tuple[Transcript, dict]:
        # The daily audio quota, on the decoded duration, before any work: a refusal costs nothing.
        await self._accounting.check_audio.remote(key_id, audio.duration_s)
        # No retry anywhere here: a transcription runs once.
        asr_call = self._asr.transcribe.remote(audio, params.asr_options())
        word_speakers = None
        if params.diarize:
            # Diarization runs beside ASR on the same decoded samples: no second fetch or decode.
            transcript, diarization = await asyncio.gather(
                asr_call, self._diarization.diarize.remote(audio, params.num_speakers)
            )
            word_speakers = assign_word_speakers(transcript.words, diarization.turns)
        else:
            transcript = await asr_call
        await self._accounting.charge_audio.remote(key_id, transcript.duration_s)
        body = render(
            transcript,
            request_id=request_id,
            punctuate=params.punctuate,
            timestamps=params.timestamps,
            word_speakers=word_speakers,
        ).to_json()
        return transcript, body
