"""Test media made from real speech: every supported format, and things that are not audio."""

from __future__ import annotations

import io
import struct

import av
import numpy as np

# format -> (container, codec, sample rate, layout, extra codec options)
ENCODINGS = {
    "wav": ("wav", "pcm_s16le", 16000, "mono", {}),
    "mp3": ("mp3", "libmp3lame", 44100, "stereo", {}),
    "flac": ("flac", "flac", 22050, "mono", {}),
    "ogg-vorbis": ("ogg", "vorbis", 44100, "stereo", {"strict": "experimental"}),
    "ogg-opus": ("ogg", "libopus", 48000, "mono", {}),
    "m4a-aac": ("ipod", "aac", 44100, "stereo", {}),
    "m4a-alac": ("ipod", "alac", 16000, "mono", {}),
}


def encode(samples: np.ndarray, encoding: str, sample_rate: int = 16000) -> bytes:
    """Encode float32 mono samples (at ``sample_rate``) into one of ``ENCODINGS``."""
    container_fmt, codec, rate, layout, options = ENCODINGS[encoding]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options=options)
        if options.get("strict"):
            stream.codec_context.options = {"strict": "experimental"}
        frame_size = stream.codec_context.frame_size or 1024
        # Encoders such as AAC take frames of exactly frame_size samples (the last may be short).
        resampler = av.AudioResampler(
            format=stream.codec_context.format.name, layout=layout, rate=rate, frame_size=frame_size
        )
        step = max(1, int(frame_size * sample_rate / rate))
        if codec == "aac":
            # Whole input frames only: a tiny last frame trips the MP4 muxer (EINVAL) for some
            # lengths. The padding (< 24 ms of silence) is within the tests' duration tolerance.
            samples = np.pad(samples, (0, -len(samples) % step))
        for i in range(0, len(samples), step):
            chunk = samples[i : i + step].astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = sample_rate
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    out.mux(packet)
        for resampled in resampler.resample(None):
            for packet in stream.encode(resampled):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, sample_rate: int = 16000) -> bytes:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return header + b"data" + struct.pack("<I", len(pcm)) + pcm


def long_silent_wav(duration_s: float, sample_rate: int = 8000) -> bytes:
    """8-bit mono silence: 2 h fit in 58 MB, under the size limit but over the duration limit."""
    n = int(duration_s * sample_rate)
    header = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate, 1, 8)
    return header + b"data" + struct.pack("<I", n) + b"\x80" * n


def video_only_mp4(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * 10)):
            img = np.full((48, 64, 3), (i * 20) % 255, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="image2pipe") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 8, 8, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), dtype=np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def webm_opus(samples: np.ndarray, sample_rate: int = 16000) -> bytes:
    """Opus in WebM: a container the live stream decodes but the REST API does not accept."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=48000, frame_size=960)
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(resampled):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav_header(channels: int, sample_rate: int, bits: int, data_bytes: int, *, float_samples: bool = False,
               riff_bytes: int | None = None) -> bytes:
    """A canonical 44-byte WAV header that says whatever it is told (sizes included)."""
    block = channels * bits // 8
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes if riff_bytes is None else riff_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 3 if float_samples else 1, channels, sample_rate,
                                    sample_rate * block, block, bits)
    return header + b"data" + struct.pack("<I", data_bytes & 0xFFFFFFFF)


def pcm16(samples: np.ndarray, channels: int = 1) -> bytes:
    """Mono float samples as 16-bit PCM, the same signal on every channel."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    return np.repeat(pcm[:, None], channels, axis=1).tobytes()


def silent_mp3(duration_s: float) -> bytes:
    """Silence as bare MPEG-2.5 Layer III frames (8 kHz mono, 8 kbit/s: 72 bytes per 72 ms), so
    two hours cost 7.2 MB and no encoding time. Each frame is a header and zeroed side info: no
    spectral data, which decodes to exact silence."""
    frame = b"\xff\xe3\x18\xc0" + bytes(68)
    return frame * round(duration_s / 0.072)


def id3_with_picture(picture: bytes, mime: str = "image/png") -> bytes:
    """An ID3v2.3 tag holding one attached picture (APIC, front cover), as tagged MP3s carry."""
    body = b"\x00" + mime.encode() + b"\x00\x03cover\x00" + picture
    frame = b"APIC" + struct.pack(">I", len(body)) + b"\x00\x00" + body
    size = len(frame)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + frame


def without_id3(data: bytes) -> bytes:
    """An MP3 without its leading ID3v2 tag: its bare frames."""
    if data[:3] != b"ID3":
        return data
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    return data[10 + size :]
