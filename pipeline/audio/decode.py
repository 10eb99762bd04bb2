"""Recognise audio by its content and decode it once, with PyAV, to float32 mono 16 kHz."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from pipeline.core.errors import AudioTooLong, InvalidAudio, UnsupportedFormat
from pipeline.core.types import SAMPLE_RATE, Audio

# The demuxer PyAV is told to use for each recognised format: content decides, never the name.
_DEMUXERS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg", "m4a": "mov,mp4,m4a,3gp,3g2,mj2"}
_MP4_AUDIO_CODECS = {"aac", "alac", "mp3", "mp4als"}
SNIFF_BYTES = 64
# As for live streams: below 8 kHz there is no speech band left to hear, and a 1 Hz header turns a
# few bytes into hours of audio.
MIN_SAMPLE_RATE = 8000


def _skip_id3(head: bytes) -> bytes:
    # ID3v2: "ID3", version (2), flags (1), size as 4 syncsafe bytes, excluding the 10-byte header.
    if len(head) >= 10 and head[:3] == b"ID3":
        size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
        return head[10 + size :]
    return head


def _is_mpeg_audio_frame(head: bytes) -> bool:
    if len(head) < 4 or head[0] != 0xFF or (head[1] & 0xE0) != 0xE0:
        return False
    version = (head[1] >> 3) & 0x3
    layer = (head[1] >> 1) & 0x3
    bitrate = head[2] >> 4
    rate = (head[2] >> 2) & 0x3
    # Layer 00 is ADTS AAC, not MPEG audio; index 15 bitrate and 3 sample rate are reserved.
    return version != 1 and layer != 0 and bitrate != 0xF and rate != 0x3


def sniff_format(head: bytes) -> str | None:
    """The format of a file from its first bytes (ID3 tags skipped), or None if not ours.

    ``head`` should hold the first few KiB: an ID3 tag can push the real magic further in.
    """
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "m4a"
    body = _skip_id3(head)
    if body[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3" or _is_mpeg_audio_frame(body):
        return "mp3"
    return None


def decode(
    source: str | Path | bytes | bytearray | memoryview | BinaryIO, *, max_duration_s: float, pcm16: bool = False
) -> Audio:
    """Decode a file (path, buffer or binary file object) to 16 kHz mono float32, or with
    ``pcm16`` to 16-bit PCM (half the memory; see ``Audio``).

    Raises ``UNSUPPORTED_FORMAT`` for content that is none of the supported formats (a video
    without audio included), ``INVALID_AUDIO`` for a supported container that does not decode or
    holds no audio, and ``AUDIO_TOO_LONG`` as soon as the audio is known to exceed the limit.
    """
    stream: BinaryIO
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = _BufferReader(source)
    elif isinstance(source, (str, Path)):
        stream = open(source, "rb")  # noqa: SIM115 - closed below
    else:
        stream = source
    try:
        head = stream.read(16 * 1024)
        stream.seek(0)
        if not head:
            raise InvalidAudio("The audio file is empty")
        fmt = sniff_format(head)
        if fmt is None:
            raise UnsupportedFormat("Unsupported audio format: the content is not WAV, MP3, FLAC, OGG or M4A")
        samples = _decode_stream(stream, fmt, max_duration_s, pcm16)
    finally:
        if isinstance(source, (str, Path)):
            stream.close()
    return Audio(samples=samples, source_format=fmt)


class _BufferReader(io.RawIOBase):
    """A seekable binary file over a buffer, read in place (``io.BytesIO`` copies anything but
    ``bytes`` first: an upload read from the object store would be copied whole)."""

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        n = max(0, min(len(target), len(self._view) - self._pos))
        target[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class _SampleBuffer:
    """Decoded samples gathered in one array that grows by doubling, then shrinks to fit.

    Not a list of per-frame arrays joined at the end: those are thousands of small allocations
    (an MP3 frame is 72 ms), and the heap they are freed into stays with the process, so one 2 h
    file left ~460 MB behind in its AudioFetch replica. The buffer starts at 32 MiB, the size from
    which glibc always maps an allocation of its own (only the pages written become resident), so
    that every buffer goes back to the system whole when it is freed.
    """

    def __init__(self, capacity: int = 0, dtype: type = np.float32) -> None:
        self._dtype = np.dtype(dtype)
        self._samples = np.empty(max(capacity, 32 * 2**20 // self._dtype.itemsize), dtype=self._dtype)
        self.size = 0

    def add(self, chunk: np.ndarray) -> None:
        end = self.size + len(chunk)
        if end > len(self._samples):
            grown = np.empty(max(end, 2 * len(self._samples)), dtype=self._dtype)
            grown[: self.size] = self._samples[: self.size]
            self._samples = grown
        # Samples that are NaN or infinite (float WAVs can hold them) become silence or full scale:
        # NaN reaching the model made it decode for minutes and return nothing.
        np.nan_to_num(chunk, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        if self._dtype == np.int16:  # 16-bit PCM as ffmpeg converts it: round(x * 32768), clipped
            np.clip(np.rint(chunk * 32768), -32768, 32767, out=chunk)
        self._samples[self.size : end] = chunk
        self.size = end

    def samples(self) -> np.ndarray:
        samples, self._samples = self._samples, np.empty(0, dtype=self._dtype)
        samples.resize(self.size, refcheck=False)  # shrinks in place: no copy
        if self._dtype == np.int16:
            return samples
        return np.clip(samples, -1.0, 1.0, out=samples)


def _decode_stream(stream: BinaryIO, fmt: str, max_duration_s: float, pcm16: bool) -> np.ndarray:
    max_samples = int(max_duration_s * SAMPLE_RATE)
    try:
        container = av.open(stream, mode="r", format=_DEMUXERS[fmt])
    except av.FFmpegError as exc:
        raise InvalidAudio(f"The {fmt} file cannot be decoded: {exc}") from None
    with container:
        if not container.streams.audio:
            if fmt == "m4a" and container.streams.video:
                raise UnsupportedFormat("Unsupported format: the file has video but no audio track")
            raise InvalidAudio(f"The {fmt} file holds no audio stream")
        audio_stream = container.streams.audio[0]
        if fmt == "m4a" and audio_stream.codec_context.name not in _MP4_AUDIO_CODECS:
            raise UnsupportedFormat(
                f"Unsupported audio codec in an MP4 container: {audio_stream.codec_context.name}"
            )
        rate = audio_stream.codec_context.sample_rate
        if rate < MIN_SAMPLE_RATE:
            raise InvalidAudio(f"The {fmt} file's sample rate, {rate} Hz, is below {MIN_SAMPLE_RATE} Hz")
        # Refuse early when the container already says it is too long; the sample count below
        # is what really decides, since a header can lie.
        if container.duration is not None and container.duration / av.time_base > max_duration_s + 1:
            raise AudioTooLong(int(max_duration_s))
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        # Sized from the declared duration when there is one, so that a long file is not copied
        # at every doubling (a 2 h file peaked at 1.7x its samples). Pages never written cost
        # nothing, so a header that lies only reserves address space, up to the duration cap.
        declared = container.duration / av.time_base if container.duration else 0.0
        capacity = int(min(max_duration_s, declared * 1.02 + 1.0) * SAMPLE_RATE)
        buffer = _SampleBuffer(capacity, np.int16 if pcm16 else np.float32)
        damaged = 0
        try:
            for packet in container.demux(audio_stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    # One damaged packet (the cut-off last frame of a truncated file, garbage
                    # spliced in) is skipped, as ffmpeg does; the rest of the file still counts.
                    damaged += 1
                    continue
                for frame in frames:
                    for out in resampler.resample(frame):
                        buffer.add(out.to_ndarray().reshape(-1))
                if buffer.size > max_samples:
                    raise AudioTooLong(int(max_duration_s))
        except av.FFmpegError as exc:
            # The container itself breaks off (a truncated file): what came before still counts.
            if not buffer.size:
                raise InvalidAudio(f"The {fmt} file is corrupt: {exc}") from None
        try:
            for out in resampler.resample(None):
                buffer.add(out.to_ndarray().reshape(-1))
        except av.FFmpegError as exc:
            raise InvalidAudio(f"The {fmt} file is corrupt: {exc}") from None
    if buffer.size > max_samples:
        raise AudioTooLong(int(max_duration_s))
    if not buffer.size:
        if damaged:
            raise InvalidAudio(f"The {fmt} file is corrupt: none of its {damaged} audio packets decodes")
        raise InvalidAudio(f"The {fmt} file holds no audio")
    return buffer.samples()
