"""Diarization deployment: speaker turns for decoded audio, beside ASR on the same samples."""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from deployments import replica_info

from pipeline.core.types import Diarization
from pipeline.diarization.base import DiarizationOptions
from pipeline.core.errors import InvalidParameter
from pipeline.core.settings import Settings
from pipeline.core.types import Audio

logger = logging.getLogger("ray.serve")


@serve.deployment(
    name="Diarization",
    max_ongoing_requests=8,
    max_queued_requests=32,
    ray_actor_options={"num_cpus": 0.25},
)
class DiarizationDeployment:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._unavailable: str | None = None
        try:
            from pipeline.diarization.factory import build_diarizer

            self._diarizer = build_diarizer(settings.diarization)
        except (ImportError, RuntimeError) as exc:
            # The app still serves transcription; diarize requests get a clear refusal.
            self._unavailable = f"Speaker diarization is not installed on this server ({exc})"
            logger.warning(self._unavailable)

    async def check(self) -> None:
        if self._unavailable:
            raise InvalidParameter(self._unavailable, param="diarize")

    async def diarize(self, audio: Audio, num_speakers: int | None) -> Diarization:
        await self.check()
        options = DiarizationOptions(num_speakers=num_speakers, max_speakers=self._settings.diarization.max_speakers)
        return await asyncio.to_thread(self._diarizer.diarize, audio, options)

    def describe(self) -> dict:
        return replica_info(self._settings, available=self._unavailable is None)
