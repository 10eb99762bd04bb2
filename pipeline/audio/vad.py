"""Speech spans by Silero VAD, as faster-whisper ships it (ONNX, on the CPU): the one wrapper that
chunking, streaming and diarization configure each for their own needs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.core.types import SAMPLE_RATE, as_float32

# (samples at 16 kHz) -> (start, end) sample indices of speech
SpeechFinder = Callable[[np.ndarray], list[tuple[int, int]]]


def silero_speech(**vad_options: float) -> SpeechFinder:
    """A speech finder with faster-whisper's ``VadOptions`` (``min_silence_duration_ms``,
    ``speech_pad_ms``, ``threshold``, ...; its defaults for the rest). The model loads on first use."""

    def find(samples: np.ndarray) -> list[tuple[int, int]]:
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        options = VadOptions(**vad_options)
        return [(int(s["start"]), int(s["end"])) for s in get_speech_timestamps(samples, options)]

    return find


def blockwise(find: SpeechFinder, samples: np.ndarray, block_s: float = 60) -> list[tuple[int, int]]:
    """Speech spans of the whole audio, ``find`` run on one block at a time: the VAD's buffers
    stay a block's size, and 16-bit PCM is scaled to float32 a block at a time. Spans that meet
    at a block border are joined."""
    block = int(block_s * SAMPLE_RATE)
    spans: list[tuple[int, int]] = []
    for offset in range(0, len(samples), block):
        for start, end in find(as_float32(samples[offset : offset + block])):
            start, end = start + offset, end + offset
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
    return spans


def in_blocks(find: SpeechFinder, block_s: float = 60) -> SpeechFinder:
    """``find`` over any length of audio, float32 or 16-bit PCM, a block at a time (``blockwise``)."""
    return lambda samples: blockwise(find, samples, block_s)
