"""Speech spans by Silero VAD, as faster-whisper ships it (ONNX, on the CPU): the one wrapper that
chunking, streaming and diarization configure each for their own needs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

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
