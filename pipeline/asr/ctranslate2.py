"""CTranslate2 Whisper: the CPU default (int8), also fine on CUDA.

Windows of many requests share one forward pass: the engine drives ``ctranslate2.models.Whisper``
directly (batched ``encode``, ``generate``, ``align``, ``detect_language``), as faster-whisper's
``BatchedInferencePipeline`` does within one file, and reuses faster-whisper's pieces for the rest:
its feature extractor, tokenizer, prompt, timestamp splitting, temperature fallback, token
suppression and word timing. What it keeps of ``WhisperModel.transcribe``: Silero VAD, timestamp
tokens (segments), the fallback to hotter decodes when a window's output looks degenerate, the
no-speech skip, and word timings from cross-attention alignment.
"""

from __future__ import annotations

import ctypes
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import TranscriptionOptions, get_compression_ratio, get_suppressed_tokens
from faster_whisper.vad import SpeechTimestampsMap, VadOptions, get_speech_timestamps

from pipeline.asr.base import Capabilities
from pipeline.asr.chunking import WINDOW_S, split_span, windows, with_speech
from pipeline.asr.models import resolve_model
from pipeline.asr.scheduler import WindowResult, WindowScheduler, WindowTask, step_audio_s
from pipeline.audio.vad import blockwise
from pipeline.core.settings import AsrSettings
from pipeline.core.types import SAMPLE_RATE, AsrOptions, Audio, Segment, Transcript, Word

# Silero VAD runs over blocks this long: faster-whisper's own VAD pass pads and re-frames the
# whole array at once, two extra copies of it (~1 GB for a 2 h file), and ONNX Runtime keeps an
# arena sized by the largest call (measured: a 600 s block peaks at +244 MB, a 60 s one at +57 MB).
VAD_BLOCK_S = 60
_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # faster-whisper's default fallback ladder
# After a step of at least this much audio, the heap it freed goes back to the system (see
# ``give_back_freed_heap``); not after the short steps of live streams, whose latency counts.
TRIM_AFTER_S = 10.0
_FRAMES = 3000  # mel frames of a 30 s window: what the encoder expects
_HOP = 160  # samples per mel frame


def _on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and ctranslate2.get_cuda_device_count() == 0)


def cpu_lanes(settings: AsrSettings) -> tuple[int, int, bool]:
    """(lanes, threads per lane, express lane) on a CPU.

    One thread per step, as many steps at once as cores, beside an express lane: measured on a
    2-core machine (Whisper base int8, a 30 s window, beam 5), one ``generate`` took 3.6-3.9 s on
    one thread and 5.3-8.2 s on two (the decoder's small matrix products lose more to the threads'
    synchronisation than they gain), two windows batched in one call on one thread 6.9 s, and two
    windows in two calls at once 3.6-3.9 s. Batching windows gains nothing on a CPU; steps side by
    side use every core. The express lane is one step more, for urgent work only (streams, short
    requests): it shares the cores with the others while it runs.
    """
    cores = os.cpu_count() or 1
    lanes = settings.parallel_steps or (cores if not settings.cpu_threads else max(1, cores // settings.cpu_threads))
    threads = settings.cpu_threads or max(1, cores // lanes)
    return lanes, threads, True


@dataclass
class _Work:
    """One window on its way through a batch."""

    task: WindowTask
    features: np.ndarray  # (n_mels, 3000)
    frames: int  # mel frames holding audio
    language: str = "en"
    language_probability: float = 1.0
    tokens: list[int] | None = None
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    segments: list[dict] = field(default_factory=list)  # faster-whisper's segment dicts


class CTranslate2Engine:
    supports_word_timestamps: ClassVar[bool] = True
    supports_language_detection: ClassVar[bool] = True

    def __init__(self, model: WhisperModel, settings: AsrSettings, *, lanes: int = 1, express: bool = False) -> None:
        """``lanes``: decoding steps run at once (the model's workers, which share its weights);
        ``express``: one more kept for urgent steps (``WindowScheduler.start``)."""
        self._model = model
        self._settings = settings
        self.lanes = lanes
        self.express_lane = express
        self._vad = VadOptions(min_silence_duration_ms=settings.vad_min_silence_ms)
        self._languages = frozenset(model.supported_languages)
        self._multilingual = model.model.is_multilingual
        self._tokenizers: dict[str, Tokenizer] = {}
        self.speech_windows = settings.vad_filter  # cut: the VAD's speech only, unless it is off

    @classmethod
    def from_settings(cls, settings: AsrSettings) -> "CTranslate2Engine":
        model_path = resolve_model(settings.model, settings.resolved_model_cache_dir)
        lanes, threads, express = cpu_lanes(settings) if _on_cpu(settings.device) else (1, settings.cpu_threads, False)
        model = WhisperModel(
            model_path,
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=threads,
            num_workers=lanes + express,
            download_root=str(settings.resolved_model_cache_dir),
        )
        return cls(model, settings, lanes=lanes, express=express)

    @property
    def languages(self) -> frozenset[str]:
        return self._languages

    def check(self, options: AsrOptions) -> None:
        Capabilities.of(self, self._settings.engine).refuse_unsupported(
            language=options.language, timestamps=options.word_timestamps, task=options.task
        )

    # --- the AsrEngine Protocol: a batch of whole audios, through a scheduler of its own -------
    def transcribe(self, batch: Sequence[Audio], options: Sequence[AsrOptions]) -> list[Transcript]:
        scheduler = WindowScheduler(
            self,
            max_batch_windows=self._settings.window_batch_size,
            max_batch_audio_s=step_audio_s(self._settings, self),
        )
        futures = [scheduler.submit(audio, opts) for audio, opts in zip(batch, options, strict=True)]
        workers = scheduler.start(express=False)  # the caller waits for all: nothing is more urgent
        try:
            return [f.result() for f in futures]
        finally:
            scheduler.close()
            for worker in workers:
                worker.join()

    # --- the WindowEngine Protocol -------------------------------------------------------------
    def cut(self, audio: Audio, speech_from: int | None = None) -> list[tuple[tuple[int, int], ...]]:
        """Windows of the speech only, as faster-whisper's VAD filter decodes it: speech regions
        (a region over 30 s cut at a quiet point) joined while they fit in 30 s, the silence
        between them left out; from ``speech_from`` on, all of it.

        A stream's decode is its left context, cut so, and then its utterance, which the session's
        VAD found to be speech (``speech_from``), whole. This VAD's regions on noisy speech move
        with the audio's start (MFA's cold corpus: 10 s from 0.81 s kept whole, from 0.8125 s only
        their first 4 s, the utterance at their end left out). Decoding a stream's whole audio
        instead, context too (and so no decode again of speech a decode lost: it may be silence),
        did worse: in process, pyannote's sample streamed at 25.9 / 21.6 % WER at 1x / 2x (two
        runs each) against 20.4 / 19.8 %, the real clips of ``bench/real_speech.py`` +2.3 / +1.7
        points over batch against +1.7 / +2.1 (one run each)."""
        samples = audio.samples
        window_s = min(WINDOW_S, self._settings.max_window_s)
        if not self._settings.vad_filter:
            return [((start, end),) for start, end in windows(samples, window_s=window_s)]
        limit = int(window_s * SAMPLE_RATE)
        packed: list[list[tuple[int, int]]] = []
        length = 0
        regions = self._speech_spans(samples)
        if speech_from is not None and speech_from < len(samples):
            regions = with_speech(regions, max(0, speech_from), len(samples))
        for region in regions:
            for start, end in split_span(samples, region[0], region[1], limit):
                if packed and length + (end - start) <= limit:
                    packed[-1].append((start, end))
                    length += end - start
                else:
                    packed.append([(start, end)])
                    length = end - start
        return [tuple(w) for w in packed]

    def _speech_spans(self, samples: np.ndarray) -> list[tuple[int, int]]:
        """Speech spans (samples) of the whole audio, found block by block."""

        def find(block: np.ndarray) -> list[tuple[int, int]]:
            return [(found["start"], found["end"]) for found in get_speech_timestamps(block, self._vad)]

        return blockwise(find, samples, VAD_BLOCK_S)

    def decode(self, tasks: Sequence[WindowTask]) -> list[WindowResult]:
        work = [self._features(t) for t in tasks]
        # One generate call per set of decoding options (and encoded length); windows of different
        # requests and languages share it (the language is a token of each window's own prompt).
        groups: dict[tuple, list[_Work]] = defaultdict(list)
        for w in work:
            o = w.task.options
            key = (o.beam_size, o.max_new_tokens, o.prompt, o.temperature_fallback, o.task, o.temperature, w.features.shape[-1])
            groups[key].append(w)
        # A request's language is detected on its first window and holds for all its windows:
        # the groups holding first windows decode first.
        firsts: dict[int, _Work] = {}
        for w in work:
            first = firsts.get(w.task.request)
            if w.task.language is None and (first is None or w.task.start < first.task.start):
                firsts[w.task.request] = w
        detected: dict[int, tuple[str, float]] = {}
        leaders = {id(w) for w in firsts.values()}
        for group in sorted(groups.values(), key=lambda g: not any(id(w) in leaders for w in g)):
            self._decode_group(group, detected, leaders)
        results = [self._result(w) for w in work]
        if sum(len(t.samples) for t in tasks) >= TRIM_AFTER_S * SAMPLE_RATE:
            give_back_freed_heap()
        return results

    # --- steps ---------------------------------------------------------------------------------
    def _features(self, task: WindowTask) -> _Work:
        frames = min(len(task.samples) // _HOP, _FRAMES)
        encoded = self._encoded_frames(frames, stream=task.options.stream is not None, interim=task.options.interim)
        samples = task.samples
        if encoded < _FRAMES and len(samples) < encoded * _HOP:
            # A short window is padded with silence in the audio, not with zeros in the mel: a
            # zero log-mel frame is a loud hum to Whisper, not silence, and past the speech it
            # made the decoder loop (beckett at a 10 s floor: WER 1.5 with mel zeros, 0.0 here).
            samples = np.pad(samples, (0, encoded * _HOP - len(samples)))
        mel = self._model.feature_extractor(samples)[..., :-1]  # (n_mels, frames)
        return _Work(task=task, features=pad_or_trim(mel, encoded), frames=frames)

    def _encoded_frames(self, frames: int, *, stream: bool = False, interim: bool = False) -> int:
        """Mel frames the encoder sees for a window holding ``frames``: 30 s, or with short windows
        on, the window rounded up to whole seconds and at least the floor (CTranslate2 encodes
        fewer frames than 3000; below ~10 s Whisper's accuracy drops). Live-stream decodes have
        a floor of their own and ``stream_pad_s`` of silence after their audio; a final that holds
        less audio than the floor encodes 30 s (``interim``: a stream's interim decode)."""
        floor_s = self._settings.stream_min_window_s if stream else self._settings.min_window_s
        floor = int(floor_s * 100)
        if floor <= 0:
            return _FRAMES
        if stream and frames < floor and not interim:
            # A stream's window is filled up to the floor with its previous audio; one that could
            # not be (the stream's first words) is padded to 30 s. Padded to the floor with silence,
            # on 15 short clips (espeak-ng's sentences, the start of pyannote's sample, decoded
            # greedily) WER was 24.9 % against 21.9 %: a lone "Hello?" came out in Korean, and in a
            # known language, 23.7 % ("Hello, hello, hello, hello, I didn't know"). An interim is
            # padded to the floor: 0.35 s a decode against 1.05 s on 2 cores, so a stream's first
            # words show sooner. Its words become final only where two interims agree, 3 s from the
            # live edge (``unstable_tail_s``): at a stream's start the final decodes nearly all of
            # them again. Language detection is no worse at 10 s than at 30 s (espeak-ng's eight
            # sentences and pyannote's sample, their first 0.5, 1 and 2 s and whole: wrong 3 times
            # of 36 either way, all on 2 s or less), and a stream takes its language from a final
            # (``StreamingSession.language``), not from an interim's first half second.
            return _FRAMES
        # A stream's audio ends at the live edge, often mid-phrase: with no silence after it in
        # the window, Whisper loops and repeats itself ("at least at least at least ...").
        pad = int(self._settings.stream_pad_s * 100) if stream else 0
        return min(_FRAMES, max(floor, -(-frames // 100) * 100 + pad))

    def _tokenizer(self, language: str, task: str = "transcribe") -> Tokenizer:
        if (language, task) not in self._tokenizers:
            self._tokenizers[(language, task)] = Tokenizer(
                self._model.hf_tokenizer, self._multilingual, task=task, language=language
            )
        return self._tokenizers[(language, task)]

    def _options(self, options: AsrOptions, tokenizer: Tokenizer) -> TranscriptionOptions:
        """faster-whisper's own options, with its ``transcribe`` defaults."""
        return TranscriptionOptions(
            beam_size=options.beam_size or self._settings.beam_size,
            best_of=5,
            patience=1,
            length_penalty=1,
            repetition_penalty=1,
            no_repeat_ngram_size=0,
            log_prob_threshold=-1.0,
            no_speech_threshold=0.6,
            compression_ratio_threshold=2.4,
            condition_on_previous_text=False,
            prompt_reset_on_temperature=0.5,
            temperatures=_temperatures(options),
            initial_prompt=options.prompt,
            prefix=None,
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
            without_timestamps=False,
            max_initial_timestamp=1.0,
            word_timestamps=True,
            prepend_punctuations="\"'“¿([{-",
            append_punctuations="\"'.。,，!！?？:：”)]}、",
            multilingual=False,
            max_new_tokens=options.max_new_tokens,
            clip_timestamps="0",
            hallucination_silence_threshold=None,
            hotwords=None,
        )

    def _prompt(self, tokenizer: Tokenizer, options: AsrOptions) -> list[int]:
        previous = tokenizer.encode(" " + options.prompt.strip()) if options.prompt else []
        return self._model.get_prompt(tokenizer, previous, without_timestamps=False)

    def _encode(self, group: list[_Work]):
        """The group's encoder output, one batch. On a CPU the windows go through the encoder one
        at a time: an encoder call's working memory grows with its batch (measured, Whisper base
        int8, 30 s windows: +109 / +228 / +410 MB for 1 / 2 / 4 windows; most of it, by the sizes,
        the self-attention's (heads, frames, frames) scores) for no gain in time, where a batch of
        windows costs the sum of them."""
        if self._model.model.device != "cpu" or len(group) == 1:
            return self._model.encode(np.stack([w.features for w in group]))
        one_by_one = [np.asarray(self._model.encode(w.features[np.newaxis])) for w in group]
        return ctranslate2.StorageView.from_array(np.concatenate(one_by_one))

    def _decode_group(self, group: list[_Work], detected: dict[int, tuple[str, float]], leaders: set[int]) -> None:
        model = self._model
        encoder_output = self._encode(group)
        # Languages: given, or detected on the request's first window (``leaders``) and recorded
        # in ``detected`` for its other windows; a window whose first one is in a later group
        # (rare: another encoded length) keeps its own detection.
        unknown = [i for i, w in enumerate(group) if w.task.language is None]
        for w in group:
            w.language = w.task.language or "en"
        if unknown and self._multilingual:
            found = model.model.detect_language(encoder_output)
            order = sorted(unknown, key=lambda i: id(group[i]) not in leaders)  # first windows first
            for i in order:
                token, probability = found[i][0]
                request = group[i].task.request
                if id(group[i]) in leaders:
                    detected[request] = (token[2:-2], float(probability))
                own = (token[2:-2], float(probability))
                group[i].language, group[i].language_probability = detected.get(request, own)
        elif unknown:
            for i in unknown:
                group[i].language_probability = 1.0
        options = group[0].task.options
        tokenizers = [self._tokenizer(w.language, options.task) for w in group]
        fw_options = self._options(options, tokenizers[0])
        prompts = [self._prompt(t, options) for t in tokenizers]
        max_length = len(prompts[0]) + options.max_new_tokens if options.max_new_tokens else model.max_length
        if max_length > model.max_length:  # faster-whisper's own refusal, in its words
            raise ValueError(
                f"The length of the prompt is {len(prompts[0])}, and the `max_new_tokens` {options.max_new_tokens}: "
                f"together more than the `max_length` of the Whisper model, {model.max_length}."
            )
        if options.temperature > 0:
            # A temperature asked for (the OpenAI API's ``temperature``): faster-whisper's own
            # sampling decode and ladder upwards from it, window by window.
            for w, tokenizer, prompt in zip(group, tokenizers, prompts, strict=True):
                result, w.avg_logprob, _, _ = model.generate_with_fallback(
                    model.encode(w.features), prompt, tokenizer, fw_options)
                w.tokens, w.no_speech_prob = result.sequences_ids[0], result.no_speech_prob
            self._align(group, encoder_output, fw_options)
            return
        results = model.model.generate(
            encoder_output,
            prompts,
            beam_size=fw_options.beam_size,
            patience=fw_options.patience,
            length_penalty=fw_options.length_penalty,
            max_length=max_length,
            suppress_blank=fw_options.suppress_blank,
            suppress_tokens=fw_options.suppress_tokens,
            return_scores=True,
            return_no_speech_prob=True,
            max_initial_timestamp_index=int(round(fw_options.max_initial_timestamp / model.time_precision)),
        )
        for w, tokenizer, prompt, result in zip(group, tokenizers, prompts, results, strict=True):
            tokens = result.sequences_ids[0]
            w.tokens = tokens
            w.avg_logprob = result.scores[0] * len(tokens) ** fw_options.length_penalty / (len(tokens) + 1)
            w.no_speech_prob = result.no_speech_prob
            if len(fw_options.temperatures) > 1 and self._degenerate(w, tokenizer, fw_options):
                # Rare: faster-whisper's own ladder of hotter decodes, on this window alone.
                single = model.encode(w.features)
                again, w.avg_logprob, _, _ = model.generate_with_fallback(
                    single, prompt, tokenizer, replace(fw_options, temperatures=fw_options.temperatures[1:])
                )
                w.tokens, w.no_speech_prob = again.sequences_ids[0], again.no_speech_prob
        self._align(group, encoder_output, fw_options)

    @staticmethod
    def _degenerate(w: _Work, tokenizer: Tokenizer, o: TranscriptionOptions) -> bool:
        """faster-whisper's test for a decode worth redoing hotter (repetitive or unlikely), except
        where it is silence."""
        text = tokenizer.decode(w.tokens or []).strip()
        unlikely = w.avg_logprob < o.log_prob_threshold
        if w.no_speech_prob > o.no_speech_threshold and unlikely:
            return False
        return get_compression_ratio(text) > o.compression_ratio_threshold or unlikely

    def _align(self, group: list[_Work], encoder_output, o: TranscriptionOptions) -> None:
        """Segments by timestamp tokens, and word times from cross-attention, per language (the
        alignment's start sequence names it)."""
        model = self._model
        for w in group:
            w.segments = []
            silent = w.no_speech_prob > o.no_speech_threshold and w.avg_logprob < o.log_prob_threshold
            if silent:  # faster-whisper skips such a window as silence
                continue
            tokenizer = self._tokenizer(w.language, w.task.options.task)
            duration = len(w.task.samples) / SAMPLE_RATE
            segment_size = int(np.ceil(duration) * model.frames_per_second)
            pieces, _, single_ending = model._split_segments_by_timestamps(
                tokenizer=tokenizer,
                tokens=w.tokens,
                time_offset=0.0,  # times within the joined pieces; mapped back in _result
                segment_size=segment_size,
                segment_duration=duration,
                seek=0,
            )
            used = sum(len(p["tokens"]) for p in pieces)
            if used < len(w.tokens):
                # Batched decoding never seeks back: text after the last timestamp pair is kept,
                # ending with the window.
                rest = w.tokens[used:]
                start = pieces[-1]["end"] if pieces else 0.0
                pieces.append({"start": start, "end": duration, "tokens": rest})
            w.segments = [
                dict(p, seek=0, text=tokenizer.decode(p["tokens"]))
                for p in pieces
                if tokenizer.decode(p["tokens"]).strip()
            ]
        # One align call per language; an unusual mix (detected languages differ) re-encodes.
        by_language: dict[str, list[int]] = defaultdict(list)
        for i, w in enumerate(group):
            if w.segments:
                by_language[w.language].append(i)
        for language, members in by_language.items():
            if len(members) == len(group):
                output = encoder_output
            else:
                output = self._encode([group[i] for i in members])
            ordered = [group[i] for i in members]
            model.add_word_timestamps(
                [w.segments for w in ordered],
                self._tokenizer(language),
                output,
                [w.frames for w in ordered],
                o.prepend_punctuations,
                o.append_punctuations,
                0.0,
            )

    def _result(self, w: _Work) -> WindowResult:
        duration = w.task.duration_s
        tokenizer = self._tokenizer(w.language)
        # Times within the joined pieces → times in the request's audio (faster-whisper's map).
        spans = w.task.pieces or ((w.task.start, w.task.start + len(w.task.samples)),)
        times = SpeechTimestampsMap([{"start": a, "end": b} for a, b in spans], SAMPLE_RATE)

        def word(x: dict) -> Word:
            # A word stays in one piece: the one holding its middle, as faster-whisper maps it (by
            # its start, a word timed a little early fell into the piece before, seconds away).
            piece = times.get_chunk_index((x["start"] + x["end"]) / 2)
            start = times.get_original_time(x["start"], piece)
            end = times.get_original_time(x["end"], piece)
            return Word(text=x["word"], start=_clamp(start, duration), end=_clamp(max(end, start), duration),
                        probability=float(x["probability"]))

        segments = []
        for piece in w.segments:
            words = tuple(word(x) for x in piece.get("words") or ())
            start = times.get_original_time(piece["start"])
            end = times.get_original_time(piece["end"], is_end=True)
            segments.append(
                Segment(
                    text=piece["text"],
                    start=_clamp(start, duration),
                    end=_clamp(max(end, start), duration),
                    avg_logprob=float(w.avg_logprob),
                    num_tokens=len([t for t in piece["tokens"] if t < tokenizer.eot]),
                    words=words,
                )
            )
        return WindowResult(
            segments=tuple(segments),
            language=w.language,
            language_probability=w.language_probability if w.task.language is None else 1.0,
        )


def _clamp(t: float, duration: float) -> float:
    return float(min(max(t, 0.0), duration))


def _temperatures(options: AsrOptions) -> list[float]:
    """Whisper's fallback ladder from the requested temperature up (0 → 0.0, 0.2, ..., 1.0)."""
    if not options.temperature_fallback:
        return [options.temperature]
    return [options.temperature, *(t for t in _TEMPERATURES if t > options.temperature)]


try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc
except (OSError, AttributeError):  # another C library: nothing to give back this way
    _malloc_trim = None


def give_back_freed_heap() -> None:
    """Return the memory CTranslate2 freed to the system. A decoding step allocates its working
    memory from glibc's per-thread arenas, which keep what is freed: on a 2 h file the ASR
    replica grew by ~100 MB a 30 s window and held it (+865 MB after 4 windows, in process);
    trimmed after each step, it falls back between steps (+738 MB at the peak). ~30 ms a call."""
    if _malloc_trim is not None:
        _malloc_trim(0)
