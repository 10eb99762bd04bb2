"""ASR deployment: holds one engine, gathers concurrent requests into batches."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments import replica_info

from pipeline.asr.base import transcribe_each
from pipeline.core.settings import Settings
from pipeline.core.types import AsrOptions, Audio, Transcript


@serve.deployment(
    name="ASR",
    max_ongoing_requests=8,
    max_queued_requests=32,
    graceful_shutdown_timeout_s=900,
    ray_actor_options={"num_cpus": 1},
)
class AsrDeployment:
    def __init__(self, settings: Settings) -> None:
        from pipeline.asr.factory import build_engine

        self._settings = settings
        self._engine = build_engine(settings.asr)
        self._batched.set_max_batch_size(settings.asr.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.asr.batch_wait_s)

    async def transcribe(self, audio: Audio, options: AsrOptions) -> Transcript:
        # Options the model cannot honour are refused before the request waits for a batch.
        self._engine.check(options)
        outcome = await self._batched(audio, options)
        if isinstance(outcome, Exception):  # this request's own error, not its batch's
            raise outcome
        return outcome

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _batched(self, audios: list[Audio], options: list[AsrOptions]) -> list[Transcript | Exception]:
        # The engine blocks for seconds: run it off the event loop so health checks still answer.
        return await asyncio.to_thread(transcribe_each, self._engine, audios, options)

    def capabilities(self):
        from pipeline.asr.base import Capabilities

        return Capabilities.of(self._engine, self._settings.asr.engine)

    def describe(self) -> dict:
        return replica_info(self._settings, languages=sorted(self._engine.languages))
