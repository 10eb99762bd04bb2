"""A live stream's bytes → 16 kHz mono float32 as they arrive: raw linear16 PCM, or a container
(Ogg/Opus, WebM, MP3, FLAC, ...) decoded by PyAV in a thread of its own."""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from pipeline.core.types import SAMPLE_RATE


class Linear16Decoder:
    """Raw little-endian 16-bit PCM frames → 16 kHz mono float32, across frame boundaries."""

    def __init__(self, sample_rate: int, channels: int) -> None:
        import av

        self.sample_rate, self.channels = sample_rate, channels
        self._carry = b""  # a partial sample split between two frames
        self._resampler = (
            None if sample_rate == SAMPLE_RATE else av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        )

    def decode(self, data: bytes) -> np.ndarray:
        import av

        data = self._carry + data
        usable = len(data) - len(data) % (2 * self.channels)
        self._carry = data[usable:]
        pcm = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
        mono = pcm.reshape(-1, self.channels).mean(axis=1) if self.channels > 1 else pcm
        if self._resampler is None or not len(mono):
            return mono
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._resample(frame)

    def close(self, max_s: float | None = None) -> np.ndarray:
        """The resampler's last few milliseconds (it holds back samples it needs to filter with;
        once flushed it has none): under one frame's worth, so ``max_s`` is not needed."""
        return self._resample(None) if self._resampler is not None else np.zeros(0, np.float32)

    def _resample(self, frame) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def abort(self) -> None:
        pass


class ContainerDecoder:
    """An encoded stream (Ogg/Opus, WebM, MP3, FLAC, ...) decoded as its bytes arrive.

    PyAV reads from a pipe that blocks until the next frame of bytes comes, in a thread of its
    own; ``decode`` hands over the bytes and returns whatever audio is ready so far. Both sides are
    bounded: the pipe holds at most ``max_backlog_bytes`` not yet read (more means the stream comes
    faster than it decodes: ``RATE_LIMITED``), and the thread stops decoding while
    ``max_ready_s`` of audio waits to be taken.
    """

    def __init__(self, max_backlog_bytes: int = 4 << 20, max_ready_s: float = 10.0) -> None:
        import threading

        self._pipe = _BlockingPipe()
        self._max_backlog_bytes = max_backlog_bytes
        self._max_ready = int(max_ready_s * SAMPLE_RATE)
        self._ready: list[np.ndarray] = []  # decoded, not yet taken
        self._ready_n = 0  # samples in _ready
        self._cond = threading.Condition()  # guards _ready, _ready_n, _stop, _done
        self._stop = False  # the reader wants no more audio
        self._done = False  # the decoder thread has ended
        self._error: Exception | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="stream-decoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import av

        try:
            with av.open(self._pipe, mode="r") as container:
                if not container.streams.audio:
                    raise ValueError("the stream has no audio track")
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                for frame in container.decode(container.streams.audio[0]):
                    for out in resampler.resample(frame):
                        self._emit(out.to_ndarray().reshape(-1).copy())
                for out in resampler.resample(None):
                    self._emit(out.to_ndarray().reshape(-1).copy())
        except _Stopped:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the stream by decode()
            self._error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _emit(self, samples: np.ndarray) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stop or self._ready_n < self._max_ready)
            if self._stop:
                raise _Stopped
            self._ready.append(samples)
            self._ready_n += len(samples)
            self._cond.notify_all()

    def _take(self) -> np.ndarray:
        with self._cond:
            parts, self._ready, self._ready_n = self._ready, [], 0
            self._cond.notify_all()
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _check(self) -> None:
        if self._error is not None:
            from pipeline.core.errors import InvalidAudio

            raise InvalidAudio(f"The audio stream cannot be decoded: {self._error}")

    def decode(self, data: bytes) -> np.ndarray:
        self._check()
        if self._pipe.backlog + len(data) > self._max_backlog_bytes:
            from pipeline.core.errors import RateLimited

            raise RateLimited("The stream arrives faster than it can be decoded: send it at the pace it is spoken",
                              retry_after=1)
        self._pipe.write(data)
        return self._take()

    def close(self, max_s: float | None = None) -> np.ndarray:
        """End of stream: wait for the decoder to finish and return the rest (once). With
        ``max_s``, stop decoding once more than that is decoded, for a caller that would refuse
        more anyway."""
        if self._closed:
            return np.zeros(0, np.float32)
        self._closed = True
        self._pipe.end()
        limit = math.inf if max_s is None else max_s * SAMPLE_RATE
        deadline = time.monotonic() + 30
        parts: list[np.ndarray] = []
        taken = 0
        ended = False  # the decoder reached the end of the stream by itself
        while taken <= limit and not ended and time.monotonic() < deadline:
            with self._cond:
                self._cond.wait_for(lambda: self._ready or self._done, timeout=deadline - time.monotonic())
                ended = self._done
            parts.append(self._take())
            taken += len(parts[-1])
        self._halt()
        if ended:
            self._check()
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def abort(self) -> None:
        """Stop decoding at once, dropping what is pending (a stream that ended early)."""
        self._closed = True
        self._halt()

    def _halt(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._pipe.end(discard=True)
        self._thread.join(timeout=5)


class _Stopped(Exception):
    """The reader stopped the decoder."""


class _BlockingPipe:
    """A read-only file whose ``read`` waits for the next chunk of bytes, or the end.

    Chunks are handed on as they came (a read returns at most one), never joined into a growing
    buffer; ``backlog`` is the bytes written and not yet read.
    """

    def __init__(self) -> None:
        import threading

        self._chunks: deque[memoryview] = deque()
        self._cond = threading.Condition()
        self._eof = False
        self.backlog = 0

    def write(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(memoryview(data))
            self.backlog += len(data)
            self._cond.notify_all()

    def end(self, discard: bool = False) -> None:
        """No more bytes will come; ``discard`` also drops those not read yet."""
        with self._cond:
            self._eof = True
            if discard:
                self._chunks.clear()
                self.backlog = 0
            self._cond.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._chunks or self._eof)
            if not self._chunks:
                return b""
            head = self._chunks.popleft()
            if 0 <= n < len(head):
                self._chunks.appendleft(head[n:])
                head = head[:n]
            self.backlog -= len(head)
        return bytes(head)


CONTAINER_ENCODINGS = frozenset({"opus", "ogg-opus", "ogg", "webm", "mp3", "flac", "aac", "m4a", "wav", "container"})


def stream_decoder(encoding: str, sample_rate: int, channels: int, *, max_backlog_bytes: int = 4 << 20,
                   max_ready_s: float = 10.0):
    """The decoder for a stream's ``encoding``: raw ``linear16``, or any container we decode
    (with its bounds, see ``ContainerDecoder``)."""
    if check_encoding(encoding) == "linear16":
        return Linear16Decoder(sample_rate, channels)
    return ContainerDecoder(max_backlog_bytes, max_ready_s)


def check_encoding(encoding: str) -> str:
    """``encoding`` if a stream may use it, else ``INVALID_PARAMETER`` naming the choices."""
    if encoding == "linear16" or encoding in CONTAINER_ENCODINGS:
        return encoding
    from pipeline.core.errors import InvalidParameter

    raise InvalidParameter(
        f"Unsupported encoding {encoding!r}: use linear16 or a container ({', '.join(sorted(CONTAINER_ENCODINGS))})",
        param="encoding",
    )
