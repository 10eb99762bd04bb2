"""Diarization deployment: speaker turns for decoded audio, beside ASR on the same samples."""

from __future__ import annotations

from ray import serve

from deployments import adopt_serve_logging, replica_info, yield_cpu_to_the_front
from pipeline.core.settings import Settings
from pipeline.core.types import Audio, Diarization
from pipeline.transcription.flow import LocalSpeakers


@serve.deployment(
    name="Diarization",
    max_ongoing_requests=8,
    max_queued_requests=32,
    ray_actor_options={"num_cpus": 0.25},
)
class DiarizationDeployment:
    def __init__(self, settings: Settings) -> None:
        adopt_serve_logging()
        self._settings = settings
        yield_cpu_to_the_front(settings)
        # Built now; without its packages the app still serves transcription and diarize
        # requests get a clear refusal.
        self._speakers = LocalSpeakers(settings.diarization, eager=True)

    async def check(self) -> None:
        await self._speakers.check()

    async def diarize(self, audio: Audio, num_speakers: int | None) -> Diarization:
        return await self._speakers.diarize(audio, num_speakers)

    def describe(self) -> dict:
        return replica_info(self._settings, available=self._speakers.unavailable is None)
