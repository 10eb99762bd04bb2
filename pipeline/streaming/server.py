"""One live stream, end to end: query options, the message loop, the closing messages.

Framework-free: it talks to the client through a ``Channel`` (the ingress adapts Starlette's
WebSocket to it) and to ASR through the ``TranscriptionFlow``'s recognizer. Authentication,
admission and the audio charge stay with the caller, which knows the key. Each stream is held to
its ``StreamLimits`` (frame size, pace, length), and its CPU work (decoding, VAD) runs in a small
thread pool, off the event loop that serves every stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.core.errors import (
    AudioTooLong, HarkError, InvalidAudio, InvalidParameter, RateLimited, ServiceUnavailable, StreamTimeout,
)
from pipeline.core.types import SAMPLE_RATE
from pipeline.streaming.decoders import check_encoding, stream_decoder
from pipeline.streaming.limits import FrameTooLarge, StreamBudget, StreamLimits
from pipeline.streaming.session import StreamingSession, StreamOptions
from pipeline.transcription.flow import Meter, TranscriptionFlow
from pipeline.transcription.schemas import ListenParams

logger = logging.getLogger(__name__)
ENDPOINTING_OFF_MS = 10**9  # endpointing=false: utterances end only at CloseStream or their cap


class ChannelClosed(Exception):
    """The client went away."""


class Channel(Protocol):
    """A WebSocket as the stream needs it. ``receive`` returns ``{"bytes": ...}`` or
    ``{"text": ...}`` and raises ``ChannelClosed`` when the client disconnects."""

    async def receive(self) -> dict[str, Any]: ...

    async def send_json(self, message: dict[str, Any]) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


class StreamParams(BaseModel):
    """Query options of ``GET /v1/listen/stream`` (unknown names are ignored, as Deepgram does)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    language: str | None = None
    punctuate: bool = True
    encoding: str = "linear16"
    sample_rate: int = Field(16000, ge=8000, le=192000)
    channels: int = Field(1, ge=1, le=8)
    endpointing_ms: int | None = Field(300, ge=10, le=60000)  # None: endpointing=false
    interim_results: bool = True

    @field_validator("encoding", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> "StreamParams":
        """From query strings; the first bad option is ``INVALID_PARAMETER`` naming it."""
        listen = ListenParams.parse({k: query[k] for k in ("language", "punctuate") if k in query})
        fields: dict[str, Any] = {k: query[k] for k in ("encoding", "sample_rate", "channels", "interim_results")
                                  if k in query}
        endpointing = query.get("endpointing")
        if endpointing is not None:
            fields["endpointing_ms"] = None if endpointing.lower() == "false" else endpointing
        try:
            params = cls(language=listen.language, punctuate=listen.punctuate, **fields)
            check_encoding(params.encoding)
            return params
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "query"
            param = "endpointing" if name == "endpointing_ms" else name
            if error["type"] in ("greater_than_equal", "less_than_equal"):
                bounds = cls.model_fields[name].metadata
                low, high = bounds[0].ge, bounds[1].le
                raise InvalidParameter(f"{param} must be between {low} and {high}", param=param) from None
            if error["type"].startswith("int"):
                raise InvalidParameter(f"{param} must be an integer", param=param) from None
            if error["type"].startswith("bool"):
                raise InvalidParameter(f"{param} must be true or false", param=param) from None
            raise InvalidParameter(f"{param}: {error['msg']}", param=param) from None

    def session_options(self, final_beam_size: int | None = StreamOptions.final_beam_size) -> StreamOptions:
        # An endpoint the client gives ends every utterance; the default waits longer after a
        # fragment (``StreamOptions.fragment_endpointing_ms``).
        given = "endpointing_ms" in self.model_fields_set
        return StreamOptions(language=self.language, punctuate=self.punctuate,
                             interim_results=self.interim_results,
                             endpointing_ms=ENDPOINTING_OFF_MS if self.endpointing_ms is None else self.endpointing_ms,
                             fragment_endpointing_ms=0 if given else StreamOptions.fragment_endpointing_ms,
                             final_beam_size=final_beam_size)


def _control(text: str | None) -> str | None:
    """The type of a control message, or None for anything malformed."""
    try:
        kind = json.loads(text or "").get("type")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    return kind if kind in ("KeepAlive", "CloseStream") else None


async def send_error(channel: Channel, err: HarkError, close_code: int) -> None:
    try:
        await channel.send_json({"type": "Error", **err.to_body()})
        await channel.close(close_code, err.code)
    except Exception:  # noqa: BLE001 - the client may already be gone
        pass


def _as_hark_error(exc: BaseException) -> HarkError:
    if isinstance(exc, HarkError):
        return exc
    logger.exception("stream failed", exc_info=exc)
    return HarkError("Internal error")


class _Backlog:
    """What a stream's reader has taken in and its transcription loop not yet used, in order;
    counts the audio seconds it holds."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._samples = 0  # an integer count: a float sum of seconds never returns to exactly 0

    @property
    def audio_s(self) -> float:
        return self._samples / SAMPLE_RATE

    def put(self, kind: str, value: Any = None) -> None:
        if kind == "audio":
            self._samples += len(value)
        self._queue.put_nowait((kind, value))

    async def get(self) -> tuple[str, Any]:
        kind, value = await self._queue.get()
        if kind == "audio":
            self._samples -= len(value)
        return kind, value


def _close_code(err: HarkError) -> int:
    """The WebSocket close code (RFC 6455) that goes with an error that ends a stream."""
    if isinstance(err, FrameTooLarge):
        return 1009  # message too big
    if isinstance(err, (RateLimited, AudioTooLong)):
        return 1008  # policy violation
    if isinstance(err, InvalidAudio):
        return 1003  # data it cannot accept
    if isinstance(err, ServiceUnavailable):
        return 1013  # try again later
    return 1011


class _QuotaTab:
    """A stream's running tab on its key's daily audio quota: reserved ahead in steps of
    ``step_s`` as audio arrives (a refusal ends the stream), settled on what was received."""

    def __init__(self, meter: Meter, step_s: float) -> None:
        self._meter, self._step_s = meter, step_s
        self._reservation: str | None = None
        self._covered_s = 0.0

    async def open(self) -> None:
        self._reservation = await self._meter.reserve(0.0)  # refused if the quota is spent already

    async def cover(self, received_s: float) -> None:
        while received_s > self._covered_s:
            await self._meter.extend(self._reservation, self._step_s)
            self._covered_s += self._step_s

    async def close(self, received_s: float) -> None:
        if self._reservation is not None:
            try:
                await self._meter.settle(self._reservation, received_s)
            except Exception:  # noqa: BLE001 - the stream is over; the reservation lapses on its own
                logger.exception("charging a stream's audio failed")


class StreamServer:
    """Serves streams over a flow, each held to ``limits``."""

    def __init__(self, flow: TranscriptionFlow, limits: StreamLimits, *, cpu_threads: int = 4,
                 final_beam_size: int | None = StreamOptions.final_beam_size,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._flow, self._limits, self._clock = flow, limits, clock
        self._final_beam_size = final_beam_size  # None: the engine's width
        # VAD and decoding take milliseconds a call; a few threads keep the loop free without
        # letting many streams crowd the cores.
        self._cpu = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="stream-cpu")

    async def serve(self, channel: Channel, params: StreamParams, meter: Meter) -> None:
        """Run one stream to its end, on the caller's audio quota: the audio received is reserved
        as it arrives (``RATE_LIMITED`` ends the stream when the quota runs out) and charged
        however the stream ends, a cancelled one included.

        ``params`` are parsed by the caller (``StreamParams.parse``) before it accepts the socket,
        so that bad options are refused in the handshake, as Deepgram refuses them."""
        request_id = f"req_{uuid.uuid4().hex}"
        tab = _QuotaTab(meter, self._limits.quota_step_s)
        try:
            await tab.open()
            try:
                caps = await self._flow.capabilities()
            except HarkError as err:  # ASR unreachable or its queue full: say so
                await send_error(channel, err, close_code=1013)
                return
            caps.refuse_unsupported(language=params.language, streaming=True)
            decoder = stream_decoder(params.encoding, params.sample_rate, params.channels,
                                     max_backlog_bytes=self._limits.decoder_backlog_bytes,
                                     max_ready_s=self._limits.burst_s)
        except HarkError as err:
            await send_error(channel, err, close_code=1008)
            return
        session = StreamingSession(transcribe=self._flow.recognizer.transcribe,
                                   options=params.session_options(self._final_beam_size),
                                   executor=self._cpu)
        budget = StreamBudget(self._limits, clock=self._clock)
        try:
            await self._loop(channel, session, decoder, budget, tab, request_id, params.channels)
        finally:
            session.close()
            try:
                await asyncio.to_thread(decoder.abort)  # stops a container decoder's thread
            finally:
                await asyncio.shield(tab.close(session.received_s))

    async def _read(self, channel: Channel, decoder, budget: StreamBudget, backlog: _Backlog) -> None:
        """Take the client's frames as they come until CloseStream or an error (which is queued
        for the transcription loop to answer, in its turn)."""
        idle, limits = self._limits.idle_timeout_s, self._limits
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    message = await asyncio.wait_for(channel.receive(), timeout=idle)
                except asyncio.TimeoutError:
                    raise StreamTimeout(f"No audio or KeepAlive for {idle:g} s") from None
                if message.get("bytes") is not None:
                    budget.check_frame(len(message["bytes"]))
                    samples = await loop.run_in_executor(self._cpu, decoder.decode, message["bytes"])
                    budget.take(len(samples) / SAMPLE_RATE)
                    if backlog.audio_s + len(samples) / SAMPLE_RATE > limits.max_backlog_s:
                        raise ServiceUnavailable(
                            f"The server cannot keep up with this stream: more than {limits.max_backlog_s:g} s "
                            "of its audio wait to be transcribed", retry_after=30)
                    backlog.put("audio", samples)
                    continue
                control = _control(message.get("text"))
                if control == "CloseStream":
                    backlog.put("close")
                    return
                if control is None:
                    backlog.put("text")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered by the transcription loop
            backlog.put("error", exc)

    async def _loop(self, channel: Channel, session: StreamingSession, decoder, budget: StreamBudget,
                    tab: "_QuotaTab", request_id: str, channels: int) -> None:
        # Frames are read, decoded and held to the pace as they arrive, by a task of their own:
        # while a decode of the audio so far keeps this loop busy, later frames wait in the
        # backlog, not in the socket, where their arrival would look like a burst once read.
        backlog = _Backlog()
        reader = asyncio.create_task(self._read(channel, decoder, budget, backlog))
        try:
            while True:
                kind, value = await backlog.get()
                if kind == "audio":
                    await tab.cover(session.received_s + len(value) / SAMPLE_RATE)
                    # More audio already waiting: the session is behind (interims skipped).
                    for event in await session.feed(value, behind=backlog.audio_s > 0):
                        await channel.send_json(event)
                elif kind == "text":
                    await channel.send_json({"type": "Error", "code": "INVALID_PARAMETER", "param": "message",
                                             "error": 'Text frames must be {"type": "KeepAlive"} or {"type": "CloseStream"}'})
                elif kind == "error":
                    raise value
                else:  # CloseStream
                    break
            # The rest of a container, no more of it than the budget would take.
            tail = await asyncio.to_thread(decoder.close, budget.allowance_s())
            budget.take(len(tail) / SAMPLE_RATE)
            await tab.cover(session.received_s + len(tail) / SAMPLE_RATE)
        except ChannelClosed:
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered on the stream
            err = _as_hark_error(exc)
            await send_error(channel, err, close_code=_close_code(err))
            return
        finally:
            reader.cancel()
        for event in [*await session.feed(tail), *await session.finish()]:
            await channel.send_json(event)
        await channel.send_json({"type": "Metadata", "request_id": request_id, "duration": round(session.received_s, 3),
                                 "channels": channels, "language": session.language_now})
        await channel.close(1000)
