"""Audio-fetch deployment: URLs and uploads in, decoded 16 kHz mono ``Audio`` out."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from deployments import replica_info, yield_cpu_to_the_front

from pipeline.audio.loader import AudioLoader
from pipeline.core.settings import Settings
from pipeline.core.types import Audio


@serve.deployment(
    name="AudioFetch",
    max_ongoing_requests=32,
    max_queued_requests=128,
    ray_actor_options={"num_cpus": 0.25},
)
class AudioFetchDeployment:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        yield_cpu_to_the_front(settings)
        # 16-bit PCM (the loader's default): a 2 h file is 230 MB in the object store instead of
        # 460 (faster-whisper decodes to 16 bits too); ASR and diarization read it as float32 a
        # span at a time.
        self._loader = AudioLoader(settings)
        # Downloads wait on the network: more threads than cores, one per ongoing request.
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fetch")

    async def from_url(self, url: str) -> Audio:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._loader.from_url, url)

    async def from_bytes(self, data: np.ndarray) -> Audio:
        """``data``: the upload's bytes as a uint8 array, read in place from the object store."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._loader.from_bytes, data)

    async def from_blob(self, url: str) -> Audio:
        """An upload the ingress wrote to the blob store (``StoredAudio``), read from there."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._loader.from_blob, url)

    def describe(self) -> dict:
        return replica_info(self._settings)
