"""Domain values. Frozen dataclasses: they cross process boundaries and are never mutated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Audio:
    """Decoded audio, ready for any engine."""

    # (n_samples,) mono at SAMPLE_RATE: float32 in [-1, 1], or 16-bit PCM (full scale 32768) as
    # AudioFetch hands it out, half the memory on its way through the object store. Code that
    # computes on samples reads them through ``as_float32``, a span at a time.
    samples: np.ndarray
    source_format: str = "pcm"  # the container it was decoded from: wav, mp3, flac, ogg, m4a

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def span(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """``samples[start:end]`` as float32 in [-1, 1] (a view when they already are)."""
        return as_float32(self.samples[start:end])


def as_float32(samples: np.ndarray) -> np.ndarray:
    """Samples as float32 in [-1, 1]: 16-bit PCM scaled into a new array, float32 as it is.

    Never ``float_array[...] = pcm16`` or ``pcm16.astype(np.float32)``: numpy converts the
    values unscaled, 32768 times too loud."""
    if samples.dtype == np.int16:
        return np.multiply(samples, np.float32(1 / 32768), dtype=np.float32)
    return samples


@dataclass(frozen=True)
class Word:
    """A recognised word as the engine spelled it, punctuation attached (" Hello,")."""

    text: str
    start: float  # seconds from the start of the audio
    end: float
    probability: float  # 0-1


@dataclass(frozen=True)
class Segment:
    text: str
    start: float  # seconds from the start of the audio
    end: float
    avg_logprob: float  # mean log-probability of its tokens
    num_tokens: int
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    segments: tuple[Segment, ...]
    language: str  # ISO 639-1
    language_probability: float  # 1.0 when the language was given
    duration_s: float

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()

    @property
    def words(self) -> tuple[Word, ...]:
        return tuple(w for s in self.segments for w in s.words)

    @property
    def confidence(self) -> float:
        """Mean word probability; without word details, the geometric-mean token probability;
        0 when nothing was said."""
        words = self.words
        if words:
            return float(sum(w.probability for w in words) / len(words))
        tokens = sum(s.num_tokens for s in self.segments)
        if tokens == 0:
            return 0.0
        mean_logprob = sum(s.avg_logprob * s.num_tokens for s in self.segments) / tokens
        return float(min(1.0, max(0.0, np.exp(mean_logprob))))


@dataclass(frozen=True)
class AsrOptions:
    """What one request asks of the engine."""

    language: str | None = None  # ISO 639-1; None = detect
    word_timestamps: bool = False
    beam_size: int | None = None  # None: the engine's configured width (streaming interims use 1)
    prompt: str | None = None  # text said just before this audio
    temperature_fallback: bool = True  # re-decode hotter when the output looks degenerate
    max_new_tokens: int | None = None  # a bound on tokens per window (streaming sets one)
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: Whisper's any-language → English
    temperature: float = 0.0  # the first decoding's sampling temperature (0: greedy/beam); fallback goes hotter
    stream: str | None = None  # the live stream this decode is for: served before files
    interim: bool = False  # a stream's interim decode: a newer one of the same stream replaces it
    # A stream's decode: its utterance starts here in the audio (after left context). The stream's
    # VAD found it to be speech, so an engine's VAD never cuts any of it out.
    speech_from_s: float | None = None


@dataclass(frozen=True)
class SpeakerTurn:
    speaker: str  # SPEAKER_00, SPEAKER_01, ... in order of first appearance
    start: float  # seconds
    end: float


@dataclass(frozen=True)
class Diarization:
    turns: tuple[SpeakerTurn, ...]  # sorted, never overlapping

    @property
    def speakers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.speaker for t in self.turns))
