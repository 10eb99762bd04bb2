"""DeploymentHandles as the core's Protocols, and the one translation of Ray's errors into Hark's.

Whatever a handle call raises leaves here as a ``HarkError``: the cause of a ``RayTaskError``, a
full queue (``BackPressureError``) as ``ServiceUnavailable``, a dead replica (``RayActorError``)
or lost audio (``ObjectLostError``) as ``WorkerLost``; anything else is logged and answered as an
internal error. So the core (the flow, the job runner, the stream session) never sees a Ray type.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import ObjectRef
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from pipeline.asr.base import Capabilities
from pipeline.asr.scheduler import InterimSkipped, Replaced
from pipeline.core.errors import HarkError, ServiceUnavailable, WorkerLost
from pipeline.core.types import AsrOptions, Audio, Diarization, Transcript
from pipeline.service.blobs import StoredAudio

logger = logging.getLogger("ray.serve")


def unwrap(exc: BaseException, retry_after_s: int) -> HarkError:
    """The API error for whatever a handle call raised."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, HarkError):
        return exc
    if isinstance(exc, BackPressureError):
        return ServiceUnavailable(retry_after=retry_after_s)
    if isinstance(exc, (RayActorError, ObjectLostError)):  # a replica, or the node holding the audio, died
        return WorkerLost(retry_after=retry_after_s)
    logger.exception("Unexpected error", exc_info=exc)
    return HarkError("Internal error")


async def call(response: Any, retry_after_s: int) -> Any:
    """Await a handle call; its failure as a ``HarkError``."""
    try:
        return await response
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated, never swallowed
        raise unwrap(exc, retry_after_s) from exc


@dataclass(frozen=True)
class AudioRef:
    """Decoded audio left in Ray's object store, held by the caller (the ingress, the job runner).

    The caller reads ``duration_s``; the ASR and diarization replicas receive the samples straight
    from the object store (a top-level ObjectRef argument is resolved by Ray, zero-copy on the
    same node). So a 2 h file's 230 MB (16-bit PCM) is neither copied into the ingress nor
    pickled once per consumer.
    """

    ref: ObjectRef
    duration_s: float
    source_format: str = "pcm"


def _by_reference(audio: Audio | AudioRef):
    return audio.ref if isinstance(audio, AudioRef) else audio


class HandleRecognizer:
    def __init__(self, asr: DeploymentHandle, retry_after_s: int) -> None:
        self._asr, self._retry = asr, retry_after_s

    async def capabilities(self) -> Capabilities:
        return await call(self._asr.capabilities.remote(), self._retry)

    async def transcribe(self, audio: Audio, options: AsrOptions) -> Transcript:
        answer = await call(self._asr.transcribe.remote(_by_reference(audio), options), self._retry)
        if isinstance(answer, Replaced):  # a stream's interim that newer audio replaced
            raise InterimSkipped(answer.message)
        return answer


class HandleSpeakers:
    def __init__(self, diarization: DeploymentHandle, retry_after_s: int) -> None:
        self._diarization, self._retry = diarization, retry_after_s

    async def check(self) -> None:
        await call(self._diarization.check.remote(), self._retry)

    async def diarize(self, audio: Audio, num_speakers: int | None) -> Diarization:
        return await call(self._diarization.diarize.remote(_by_reference(audio), num_speakers), self._retry)


class HandleAudio:
    """The AudioFetch deployment: URLs and bytes in, decoded ``Audio`` out."""

    def __init__(self, fetch: DeploymentHandle, retry_after_s: int) -> None:
        self._fetch, self._retry = fetch, retry_after_s

    async def from_url(self, url: str) -> AudioRef:
        return await self._kept(self._fetch.from_url.remote(url))

    async def from_blob(self, url: str) -> AudioRef:
        """An upload in the blob store, read and decoded by AudioFetch: it never passes through here."""
        return await self._kept(self._fetch.from_blob.remote(url))

    async def from_upload(self, audio: bytes | bytearray | StoredAudio) -> AudioRef:
        """A request's upload, as ``read_listen_input`` left it: in memory, or in the blob store."""
        if isinstance(audio, StoredAudio):
            return await self.from_blob(audio.url)
        return await self.from_bytes(audio)

    async def from_bytes(self, data: bytes | bytearray) -> AudioRef:
        # As an array the upload travels out of band: written once, straight into the object
        # store, and read there by AudioFetch without a copy (bytes would be copied into the
        # pickle first, and again out of it).
        return await self._kept(self._fetch.from_bytes.remote(np.frombuffer(data, np.uint8)))

    async def _kept(self, response) -> AudioRef:
        """The answer as an object reference this process owns (the caller owns what it asked
        for: the object outlives the AudioFetch replica that decoded it). Reading its duration
        maps the samples without copying or touching them."""
        ref = await call(response._to_object_ref(), self._retry)
        audio = await call(ref, self._retry)
        return AudioRef(ref, audio.duration_s, audio.source_format)


class HandleMeter:
    """One key's audio quota, kept by the Accounting deployment."""

    def __init__(self, accounting: DeploymentHandle, key_id: str, retry_after_s: int) -> None:
        self._accounting, self._key_id, self._retry = accounting, key_id, retry_after_s

    async def reserve(self, duration_s: float) -> str:
        return await call(self._accounting.reserve_audio.remote(self._key_id, duration_s), self._retry)

    async def extend(self, reservation: str, duration_s: float) -> None:
        await call(self._accounting.extend_audio.remote(self._key_id, reservation, duration_s), self._retry)

    async def settle(self, reservation: str, duration_s: float) -> None:
        await call(self._accounting.settle_audio.remote(self._key_id, reservation, duration_s), self._retry)

    async def cancel(self, reservation: str) -> None:
        await call(self._accounting.cancel_audio.remote(self._key_id, reservation), self._retry)
