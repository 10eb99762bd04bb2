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
