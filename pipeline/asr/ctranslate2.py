"""CTranslate2 Whisper through faster-whisper: the CPU default (int8), also fine on CUDA."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.transcribe import restore_speech_timestamps
from faster_whisper.vad import VadOptions, get_speech_timestamps

from pipeline.asr.base import Capabilities
from pipeline.asr.models import resolve_model
from pipeline.core.settings import AsrSettings
from pipeline.core.types import SAMPLE_RATE, AsrOptions, Audio, Segment, Transcript, Word

# Silero VAD runs over blocks this long: faster-whisper's own VAD pass pads and re-frames the
# whole array at once, two extra copies of it (~1 GB for a 2 h file).
VAD_BLOCK_S = 600


class CTranslate2Engine:
    supports_word_timestamps: ClassVar[bool] = True
    supports_language_detection: ClassVar[bool] = True

    def __init__(self, model: WhisperModel, settings: AsrSettings) -> None:
        self._model = model
        self._settings = settings
        self._vad = VadOptions(min_silence_duration_ms=settings.vad_min_silence_ms)
        self._languages = frozenset(model.supported_languages)

    @classmethod
    def from_settings(cls, settings: AsrSettings) -> "CTranslate2Engine":
        model_path = resolve_model(settings.model, settings.model_cache_dir)
        threads = settings.cpu_threads or (os.cpu_count() or 1)
        model = WhisperModel(
            model_path,
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=threads,
            download_root=str(settings.model_cache_dir),
        )
        return cls(model, settings)

    @property
    def languages(self) -> frozenset[str]:
        return self._languages

    def check(self, options: AsrOptions) -> None:
        Capabilities.of(self, self._settings.engine).refuse_unsupported(
            language=options.language, timestamps=options.word_timestamps, task=options.task
        )

    def transcribe(self, batch: Sequence[Audio], options: Sequence[AsrOptions]) -> list[Transcript]:
        # CTranslate2 parallelises inside one call (intra-op threads); running the batch in turn
        # keeps every core busy without oversubscribing them.
        return [self._transcribe_one(audio, opts) for audio, opts in zip(batch, options, strict=True)]

    def _speech_chunks(self, samples: np.ndarray) -> list[dict[str, int]]:
        """Speech spans (sample indices) of the whole audio, found block by block; spans that
        meet at a block border are joined."""
        block = VAD_BLOCK_S * SAMPLE_RATE
        chunks: list[dict[str, int]] = []
        for offset in range(0, len(samples), block):
            for found in get_speech_timestamps(samples[offset:offset + block], self._vad):
                start, end = found["start"] + offset, found["end"] + offset
                if chunks and start <= chunks[-1]["end"]:
                    chunks[-1]["end"] = max(chunks[-1]["end"], end)
                else:
                    chunks.append({"start": start, "end": end})
        return chunks

    def _transcribe_one(self, audio: Audio, options: AsrOptions) -> Transcript:
        self.check(options)
        duration = audio.duration_s
        samples, chunks = audio.samples, None
        if self._settings.vad_filter:
            # What faster-whisper's vad_filter does (decode the speech only, then map its times
            # back), with the VAD pass in blocks.
            chunks = self._speech_chunks(samples)
            spans = [samples[c["start"]:c["end"]] for c in chunks]
            samples = np.concatenate(spans) if spans else np.zeros(0, np.float32)
        segments_iter, info = self._model.transcribe(
            samples,
            language=options.language,
            task=options.task,
            beam_size=options.beam_size or self._settings.beam_size,
            initial_prompt=options.prompt,
            temperature=_temperatures(options),
            max_new_tokens=options.max_new_tokens,
            # Always on: the alignment pass costs ~1 % here, and word probabilities give the
            # overall confidence the same meaning whether or not words are returned.
            word_timestamps=True,
            vad_filter=False,
        )
        if chunks:
            segments_iter = restore_speech_timestamps(segments_iter, chunks, SAMPLE_RATE)
        segments = []
        for seg in segments_iter:  # a generator: decoding happens while iterating
            words = tuple(
                Word(
                    text=w.word,
                    start=_clamp(w.start, duration),
                    end=_clamp(max(w.end, w.start), duration),
                    probability=float(w.probability),
                )
                for w in (seg.words or ())
            )
            segments.append(
                Segment(
                    text=seg.text,
                    start=_clamp(seg.start, duration),
                    end=_clamp(seg.end, duration),
                    avg_logprob=float(seg.avg_logprob),
                    num_tokens=len(seg.tokens),
                    words=words,
                )
            )
        return Transcript(
            segments=tuple(segments),
            language=options.language or info.language,
            language_probability=1.0 if options.language else float(info.language_probability),
            duration_s=duration,
        )


def _temperatures(options: AsrOptions) -> float | tuple[float, ...]:
    """Whisper's fallback ladder from the requested temperature up (0 → 0.0, 0.2, ..., 1.0)."""
    if not options.temperature_fallback:
        return options.temperature
    return (options.temperature, *(t for t in (0.2, 0.4, 0.6, 0.8, 1.0) if t > options.temperature))


def _clamp(t: float, duration: float) -> float:
    return float(min(max(t, 0.0), duration))
