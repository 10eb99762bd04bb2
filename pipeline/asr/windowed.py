"""What the batching engines (transformers, vLLM) share: audio → 30 s windows at quiet points,
language detection on each audio's first window, Whisper prompts, temperature fallback, and
decoded tokens → words and segments at absolute times.

An engine supplies two calls over many windows at once — ``_detect`` and ``_decode`` — and the
batching across requests happens there: every window of every request in the batch goes to the
model together.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from pipeline.audio.vad import SpeechFinder, in_blocks, silero_speech
from pipeline.asr.chunking import windows
from pipeline.asr.base import Capabilities
from pipeline.core.settings import AsrSettings
from pipeline.core.types import SAMPLE_RATE, AsrOptions, Audio, Segment, Transcript, Word

# Scripts written without spaces: every token group that decodes cleanly is a word of its own.
_UNSPACED = frozenset({"zh", "ja", "th", "lo", "km", "my", "yue"})
_FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
# OpenAI's Whisper: punctuation that joins the next word, and punctuation that joins the previous one.
_OPENING = set("\"'“¿([{-")
_CLOSING = set("\"'.。,，!！?？:：”)]}、")
_COMPRESSION_RATIO_MAX = 2.4  # Whisper's thresholds for "this decode looks degenerate"
_AVG_LOGPROB_MIN = -1.0
_MAX_PROMPT_TOKENS = 223  # Whisper's limit: half the decoder context, minus the start tokens


class WhisperTokens:
    """Whisper's special tokens and text decoding, from a ``tokenizer.json`` (no transformers)."""

    def __init__(self, tokenizer_file: Path, vocab_size: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.eot = vocab["<|endoftext|>"]
        self.sot = vocab["<|startoftranscript|>"]
        self.sot_prev = vocab["<|startofprev|>"]
        self.transcribe = vocab["<|transcribe|>"]
        self.translate = vocab["<|translate|>"]
        self.no_timestamps = vocab["<|notimestamps|>"]
        # Language tokens sit between <|startoftranscript|> and <|translate|>.
        self.language_ids = {
            token[2:-2]: i
            for token, i in vocab.items()
            if self.sot < i < vocab["<|translate|>"] and token.startswith("<|") and token.endswith("|>")
        }
        # OpenAI's own rule: multilingual Whisper models have 51865 or more tokens (English-only
        # tokenizers list the language tokens too, but the models never learned them).
        self.multilingual = vocab_size >= 51865

    def prompt(self, language: str, previous_text: str | None, task: str = "transcribe") -> list[int]:
        """Decoder prompt: ``<|startofprev|> text <|startoftranscript|><|xx|><|transcribe|><|notimestamps|>``
        (``<|translate|>`` for the translate task)."""
        ids: list[int] = []
        if previous_text:
            text_ids = self.tokenizer.encode(" " + previous_text.strip(), add_special_tokens=False).ids
            ids = [self.sot_prev, *text_ids[-_MAX_PROMPT_TOKENS:]]
        ids.append(self.sot)
        if self.multilingual:
            ids += [self.language_ids[language], self.translate if task == "translate" else self.transcribe]
        ids.append(self.no_timestamps)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def text_only(self, ids: Sequence[int]) -> list[int]:
        """The ids before the first special token (``<|endoftext|>`` or beyond)."""
        out = []
        for i in ids:
            if i >= self.eot:
                break
            out.append(int(i))
        return out


@dataclass(frozen=True)
class Window:
    audio_index: int  # which audio of the batch it belongs to
    start: int  # in samples, from the start of that audio
    samples: np.ndarray  # a view of the audio's own samples: read them through ``as_float32``
    options: AsrOptions
    language: str
    prompt: tuple[int, ...]  # decoder prompt ids

    @property
    def num_frames(self) -> int:
        """Mel frames (100 per second) that hold audio rather than padding."""
        return int(np.ceil(len(self.samples) / 160))


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]  # text tokens only
    probabilities: list[float]  # of each token
    # Start of each token plus one final end time, seconds from the window start; None when the
    # engine gives no timing.
    times: list[float] | None
    avg_logprob: float


def resolve_device(setting: str) -> str:
    """``auto`` → ``cuda`` where torch sees a GPU, else ``cpu``; other settings as they are."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(setting: str, device: str) -> str:
    """``auto`` → float16 on CUDA, float32 elsewhere; other settings as they are."""
    if setting != "auto":
        return setting
    return "float16" if device == "cuda" else "float32"


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class WindowedEngine(ABC):
    """The shared half of the transformers and vLLM engines."""

    supports_word_timestamps = True
    supports_language_detection = True

    def __init__(self, tokens: WhisperTokens, settings: AsrSettings) -> None:
        self._tokens = tokens
        self._settings = settings
        # A minute at a time: faster-whisper's VAD pass copies its input twice, and the audio may
        # be 16-bit PCM (AudioFetch's), scaled to float32 a block at a time.
        self._speech: SpeechFinder | None = None
        if settings.vad_filter:
            self._speech = in_blocks(silero_speech(min_silence_duration_ms=settings.vad_min_silence_ms))

    # --- what each engine implements -----------------------------------------------------------
    @abstractmethod
    def _detect(self, first_windows: list[np.ndarray]) -> list[tuple[str, float]]:
        """(language, probability) of each 30 s window."""

    @abstractmethod
    def _decode(self, windows: list[Window], temperature: float) -> list[Decoded]:
        """Decode every window (batched as the engine likes)."""

    def warm_up(self) -> None:
        """One short decode (language detection first), past the VAD that would drop its noise:
        ``pipeline.asr.warmup`` runs it when the engine starts."""
        from pipeline.asr.warmup import WARM_UP_TOKENS, warm_up_audio

        samples = warm_up_audio()
        options = AsrOptions(max_new_tokens=WARM_UP_TOKENS, temperature_fallback=False,
                             word_timestamps=self.supports_word_timestamps)
        language = self._detect([samples])[0][0] if self._tokens.multilingual else "en"
        window = Window(audio_index=0, start=0, samples=samples, options=options, language=language,
                        prompt=tuple(self._tokens.prompt(language, None)))
        [decoded] = self._decode([window], 0.0)
        if decoded.times is not None and len(decoded.times) != len(decoded.tokens) + 1:
            raise RuntimeError(f"{len(decoded.times)} token times for {len(decoded.tokens)} tokens")

    # --- the AsrEngine Protocol ----------------------------------------------------------------
    @property
    def languages(self) -> frozenset[str]:
        return frozenset(self._tokens.language_ids) if self._tokens.multilingual else frozenset({"en"})

    def check(self, options: AsrOptions) -> None:
        Capabilities.of(self, self._settings.engine).refuse_unsupported(
            language=options.language, timestamps=options.word_timestamps, task=options.task
        )

    def spans(self, audio: Audio) -> list[tuple[int, int]]:
        """The [start, end) sample spans of ``audio`` decoded as windows: its speech only (VAD on),
        ≤ 30 s each, in order."""
        return windows(audio.samples, self._speech)

    def transcribe(self, batch: Sequence[Audio], options: Sequence[AsrOptions]) -> list[Transcript]:
        for opts in options:
            self.check(opts)
        spans = [self.spans(a) for a in batch]
        languages = self._languages(batch, options, spans)
        work = [
            Window(
                audio_index=i,
                start=start,
                samples=audio.samples[start:end],
                options=opts,
                language=languages[i][0],
                prompt=tuple(self._tokens.prompt(languages[i][0], opts.prompt, opts.task)),
            )
            for i, (audio, opts) in enumerate(zip(batch, options, strict=True))
            for start, end in spans[i]
        ]
        # One decoding call per requested temperature (almost always one: 0).
        decoded: list[Decoded] = [None] * len(work)  # type: ignore[list-item]  # every slot is filled below
        for temperature in sorted({w.options.temperature for w in work}):
            chosen = [i for i, w in enumerate(work) if w.options.temperature == temperature]
            for i, d in zip(chosen, self._decode([work[i] for i in chosen], temperature), strict=True):
                decoded[i] = d
        decoded = self._fallback(work, decoded)
        per_audio: list[list[Segment]] = [[] for _ in batch]
        for window, result in zip(work, decoded, strict=True):
            segment = self._segment(window, result, batch[window.audio_index].duration_s)
            if segment is not None:
                per_audio[window.audio_index].append(segment)
        return [
            Transcript(
                segments=tuple(per_audio[i]),
                language=languages[i][0],
                language_probability=languages[i][1],
                duration_s=audio.duration_s,
            )
            for i, audio in enumerate(batch)
        ]

    # --- shared steps --------------------------------------------------------------------------
    def _languages(self, batch, options, spans) -> list[tuple[str, float]]:
        result: list[tuple[str, float] | None] = [
            (o.language, 1.0) if o.language else None for o in options
        ]
        if not self._tokens.multilingual:
            return [(r or ("en", 1.0)) for r in result]
        todo = [i for i, r in enumerate(result) if r is None and spans[i]]
        if todo:
            firsts = [batch[i].span(*spans[i][0]) for i in todo]
            for i, found in zip(todo, self._detect(firsts), strict=True):
                result[i] = found
        # Nothing to detect from (silence): report English, Whisper's own default, with 0 confidence.
        return [r or ("en", 0.0) for r in result]

    def _fallback(self, work: list[Window], decoded: list[Decoded]) -> list[Decoded]:
        """Re-decode hotter the windows whose output looks degenerate (Whisper's recipe)."""

        def bad(d: Decoded) -> bool:
            text = self._tokens.decode(d.tokens)
            return compression_ratio(text) > _COMPRESSION_RATIO_MAX or (
                bool(d.tokens) and d.avg_logprob < _AVG_LOGPROB_MIN
            )

        decoded = list(decoded)
        for temperature in _FALLBACK_TEMPERATURES:
            redo = [i for i, d in enumerate(decoded)
                    if work[i].options.temperature_fallback and temperature > work[i].options.temperature and bad(d)]
            if not redo:
                break
            again = self._decode([replace(work[i], options=replace(work[i].options, beam_size=1)) for i in redo], temperature)
            for i, d in zip(redo, again, strict=True):
                if not bad(d) or d.avg_logprob > decoded[i].avg_logprob:
                    decoded[i] = d
        return decoded

    def _segment(self, window: Window, result: Decoded, duration: float) -> Segment | None:
        if not result.tokens:
            return None
        offset = window.start / SAMPLE_RATE
        end_of_window = offset + len(window.samples) / SAMPLE_RATE
        words = self._words(window.language, result, offset, end_of_window) if result.times else ()
        text = self._tokens.decode(result.tokens)
        if not text.strip():
            return None
        return Segment(
            text=text if text.startswith(" ") else " " + text,
            start=_clamp(words[0].start if words else offset, duration),
            end=_clamp(words[-1].end if words else end_of_window, duration),
            avg_logprob=result.avg_logprob,
            num_tokens=len(result.tokens),
            words=words,
        )

    def _words(self, language: str, result: Decoded, offset: float, limit: float) -> tuple[Word, ...]:
        """Group tokens into words, as OpenAI's Whisper does: a word starts at each token that
        begins with a space (at each clean token group in scripts without spaces); then opening
        punctuation joins the word after it and closing punctuation the word before it."""
        groups = self._token_groups(language, result.tokens)
        texts = [self._tokens.decode([result.tokens[j] for j in g]) for g in groups]
        merged: list[list[int]] = []
        carry: list[int] = []  # opening punctuation waiting for its word
        for group, text in zip(groups, texts):
            core = text.strip()
            if core and all(ch in _OPENING for ch in core):
                carry += group
            elif merged and core and all(ch in _CLOSING for ch in core):
                merged[-1] += carry + group
                carry = []
            else:
                merged.append(carry + group)
                carry = []
        if carry:
            if merged:
                merged[-1] += carry
            else:
                merged.append(carry)
        times = result.times or []
        words = []
        for group in merged:
            text = self._tokens.decode([result.tokens[j] for j in group])
            if not text.strip():
                continue
            start = min(offset + times[group[0]], limit)
            end = min(offset + times[group[-1] + 1], limit)
            words.append(
                Word(
                    text=text,
                    start=float(start),
                    end=float(max(end, start)),
                    probability=float(np.mean([result.probabilities[j] for j in group])),
                )
            )
        return tuple(words)

    def _token_groups(self, language: str, tokens: list[int]) -> list[list[int]]:
        """Token indices of each space-led piece. A multi-byte character split over tokens is
        kept whole; a stray invalid byte stays with the word before it instead of swallowing the
        words after it."""
        groups: list[list[int]] = []
        pending: list[int] = []
        for i in range(len(tokens)):
            if pending:
                alone = self._tokens.decode([tokens[i]])
                if alone.startswith(" ") and "\ufffd" not in alone:  # no continuation byte: flush
                    (groups[-1].extend(pending) if groups else groups.append(pending))
                    pending = []
            pending.append(i)
            piece = self._tokens.decode([tokens[j] for j in pending])
            if "\ufffd" in piece:
                continue
            if not groups or piece.startswith(" ") or language in _UNSPACED:
                groups.append(pending)
            else:
                groups[-1].extend(pending)
            pending = []
        if pending:  # a truncated multi-byte character at the very end
            if groups:
                groups[-1].extend(pending)
            else:
                groups.append(pending)
        return groups


def _clamp(t: float, duration: float) -> float:
    return float(min(max(t, 0.0), duration))
