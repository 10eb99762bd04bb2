"""A live stream's bytes → 16 kHz mono float32 as they arrive: raw linear16 PCM, or a container
(Ogg/Opus, WebM, MP3, FLAC, ...) decoded by PyAV in a thread of its own."""

from __future__ import annotations

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
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def close(self) -> np.ndarray:
        return np.zeros(0, np.float32)


class ContainerDecoder:
    """An encoded stream (Ogg/Opus, WebM, MP3, FLAC, ...) decoded as its bytes arrive.

    PyAV reads from a pipe that blocks until the next frame of bytes comes, in a thread of its
    own; ``decode`` hands over the bytes and returns whatever audio is ready so far.
    """

    def __init__(self) -> None:
        import queue
        import threading

        self._in: "queue.Queue[bytes | None]" = queue.Queue()
        self._out: "queue.Queue[np.ndarray]" = queue.Queue()
        self._error: Exception | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="stream-decoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import av

        pipe = _BlockingPipe(self._in)
        try:
            with av.open(pipe, mode="r") as container:
                if not container.streams.audio:
                    raise ValueError("the stream has no audio track")
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                for frame in container.decode(container.streams.audio[0]):
                    for out in resampler.resample(frame):
                        self._out.put(out.to_ndarray().reshape(-1).copy())
                for out in resampler.resample(None):
                    self._out.put(out.to_ndarray().reshape(-1).copy())
        except Exception as exc:  # noqa: BLE001 - reported to the stream by decode()
            self._error = exc
        finally:
            pipe.closed_by_reader = True

    def _drain(self) -> np.ndarray:
        parts = []
        while not self._out.empty():
            parts.append(self._out.get_nowait())
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _check(self) -> None:
        if self._error is not None:
            from pipeline.core.errors import InvalidAudio

            raise InvalidAudio(f"The audio stream cannot be decoded: {self._error}")

    def decode(self, data: bytes) -> np.ndarray:
        self._check()
        self._in.put(data)
        return self._drain()

    def close(self) -> np.ndarray:
        """End of stream: wait for the decoder to finish and return the rest (once)."""
        if self._closed:
            return np.zeros(0, np.float32)
        self._closed = True
        self._in.put(None)
        self._thread.join(timeout=30)
        self._check()
        return self._drain()


class _BlockingPipe:
    """A read-only file whose ``read`` waits for the next chunk; None in the queue is EOF."""

    def __init__(self, chunks) -> None:
        self._chunks, self._buffer, self._eof = chunks, b"", False
        self.closed_by_reader = False

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buffer) < n):
            chunk = self._chunks.get()
            if chunk is None:
                self._eof = True
            else:
                self._buffer += chunk
        if n < 0:
            n = len(self._buffer)
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


CONTAINER_ENCODINGS = frozenset({"opus", "ogg-opus", "ogg", "webm", "mp3", "flac", "aac", "m4a", "wav", "container"})


def stream_decoder(encoding: str, sample_rate: int, channels: int):
    """The decoder for a stream's ``encoding``: raw ``linear16``, or any container we decode."""
    if encoding == "linear16":
        return Linear16Decoder(sample_rate, channels)
    if encoding in CONTAINER_ENCODINGS:
        return ContainerDecoder()
    from pipeline.core.errors import InvalidParameter

    raise InvalidParameter(
        f"Unsupported encoding {encoding!r}: use linear16 or a container ({', '.join(sorted(CONTAINER_ENCODINGS))})",
        param="encoding",
    )
