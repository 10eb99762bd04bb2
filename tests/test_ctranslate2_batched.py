"""The CTranslate2 engine's batched path (``ctranslate2.models.Whisper`` driven directly, windows
of several requests in one step) against faster-whisper's own ``WhisperModel.transcribe`` on the
same model and speech. CTranslate2-only: its own file, as tests/test_engine.py also runs in the
vLLM environment."""

from dataclasses import replace

import numpy as np
import pytest

from pipeline.asr.factory import build_engine
from pipeline.asr.scheduler import WindowEngine, WindowTask
from pipeline.audio.decode import decode
from pipeline.core.settings import AsrSettings
from pipeline.core.types import AsrOptions, Audio
from textnorm import wer


@pytest.fixture(scope="module")
def engine():
    # One lane and a budget for all four windows: they share one step (the default on a CPU runs
    # steps side by side instead, tests/test_scheduler.py).
    return build_engine(AsrSettings(engine="ctranslate2", parallel_steps=1, max_batch_audio_s=240))


def load(clip):
    return decode(clip.path, max_duration_s=7200)


def test_windows_of_several_requests_and_languages_in_one_step_match_faster_whisper(engine, clips):
    assert isinstance(engine, WindowEngine)
    names = ["sample", "beckett", "spanish", "fox"]
    audios = [load(clips[n]) for n in names]
    calls = []
    decode_windows = engine.decode
    engine.decode = lambda tasks: calls.append(len(tasks)) or decode_windows(tasks)
    try:
        # Greedy on both sides keeps the test cheap; tests/test_engine.py covers the beam.
        out = engine.transcribe(audios, [AsrOptions(word_timestamps=True, beam_size=1)] * len(audios))
    finally:
        del engine.decode
    # One window each (VAD packs up to 30 s), all four in one step, their languages detected there.
    assert calls == [len(names)]
    assert [t.language for t in out] == ["en", "en", "es", "en"]
    for name, audio, t in zip(names, audios, out, strict=True):
        segments, info = engine._model.transcribe(audio.samples, beam_size=1, word_timestamps=True, vad_filter=True)
        reference = "".join(s.text for s in segments)
        # 5 % of the words, or one word on a short clip: which of "Ever tried"/"Never tried" a
        # borderline decode gives on beckett differs between CPUs (int8 kernels).
        slack = max(0.05, 1 / len(reference.split()))
        assert wer(reference, t.text) <= slack, (name, reference, t.text)
        assert wer(clips[name].text, t.text) <= wer(clips[name].text, reference) + slack, name
        words = t.words
        assert words and all(0 <= w.start <= w.end <= audio.duration_s for w in words), name
        assert all(a.start <= b.start for a, b in zip(words, words[1:])), name
        assert all(s.start <= s.end for s in t.segments)


def test_a_given_language_decodes_without_detection_and_times_map_back_through_the_speech_pieces(engine, clips):
    beckett = load(clips["beckett"])
    gap = np.zeros(16000 * 40, np.float32)
    samples = np.concatenate([beckett.samples, gap, beckett.samples])
    [window] = engine.cut(type(beckett)(samples))
    # Speech only, as faster-whisper's VAD filter decodes it: both copies in one window, the
    # 40 s of silence (and the pauses between phrases) left out.
    assert len(window) >= 2 and window[-1][1] > 50 * 16000
    assert sum(b - a for a, b in window) < 2 * len(beckett.samples)
    task = WindowTask(np.concatenate([samples[a:b] for a, b in window]), window[0][0],
                      AsrOptions(language="en", beam_size=1), "en", len(samples) / 16000, window)
    [result] = engine.decode([task])
    assert result.language == "en" and result.language_probability == 1.0
    text = "".join(s.text for s in result.segments)
    assert wer(clips["beckett"].text + " " + clips["beckett"].text, text) <= 0.1, text
    words = [w for s in result.segments for w in s.words]
    assert all(a.start <= b.start for a, b in zip(words, words[1:]))
    # Each word lies in a piece of speech (not in the gap): times mapped back to the audio.
    assert all(any(a / 16000 - 0.2 <= w.start and w.end <= b / 16000 + 0.2 for a, b in window) for w in words)
    assert sum(w.start > 45 for w in words) == len(words) // 2


def test_a_stream_s_utterance_is_never_left_out_by_the_vad(engine, clips):
    # A stream's decode: left context, then the utterance, which the stream's own VAD found to be
    # speech; this VAD's regions move with where the audio starts, and must not drop any of it.
    beckett = load(clips["beckett"])
    samples = np.concatenate([beckett.samples, np.zeros(3 * 16000, np.float32)])
    plain = [p for w in engine.cut(type(beckett)(samples)) for p in w]
    assert plain[-1][1] < len(samples) - 16000  # the VAD leaves the silence at the end out
    start = len(beckett.samples) // 2
    kept = [p for w in engine.cut(type(beckett)(samples), start) for p in w]
    assert kept[-1][1] == len(samples)
    assert [p for p in kept if p[1] < start] == [p for p in plain if p[1] < start]  # the context as before
    after = sorted(p for p in kept if p[1] > start)
    assert after[0][0] <= start and all(a[1] == b[0] for a, b in zip(after, after[1:]))  # whole


def test_short_windows_are_padded_with_silence_and_stream_decodes_encode_fewer_frames(engine, clips):
    from pipeline.asr.ctranslate2 import CTranslate2Engine

    beckett = load(clips["beckett"])
    [pieces] = engine.cut(beckett)
    samples = np.concatenate([beckett.samples[a:b] for a, b in pieces])  # ~9 s of speech

    def task(options):
        return WindowTask(samples=samples, start=0, options=options, language="en", duration_s=beckett.duration_s,
                          pieces=tuple(pieces))

    # Live-stream decodes holding 10 s at least (HARK_ASR__STREAM_MIN_WINDOW_S: the stream's
    # previous audio fills them) encode their length in whole seconds and 3 s of silence after it
    # (HARK_ASR__STREAM_PAD_S), less 30 s; files 30 s.
    assert engine._features(task(AsrOptions(stream="s"))).features.shape[-1] == 3000  # ~9 s: too short
    # ... except an interim: the floor, or its length and the silence after it, whether it is
    # given the language or detects it.
    interim = task(AsrOptions(stream="s", interim=True))
    seconds = -(-len(samples) // 16000)
    assert engine._features(interim).features.shape[-1] == max(1000, seconds * 100 + 300) < 3000
    assert engine._features(replace(interim, language=None)).features.shape[-1] == max(1000, seconds * 100 + 300)
    longer = replace(task(AsrOptions(stream="s")), samples=np.concatenate([samples, samples[: 2 * 16000]]))
    work = engine._features(longer)
    assert work.features.shape[-1] == -(-len(longer.samples) // 16000) * 100 + 300
    # The padding is silence in the audio (log-mel of zeros after the speech), not zero mel frames.
    # Whisper's log-mel of silence is its floor, the same value in every bin.
    tail = work.features[:, -250:]
    assert np.ptp(tail) < 1e-3 and tail.max() < work.features.max() - 1
    assert engine._features(task(AsrOptions())).features.shape[-1] == 3000
    # Regression: zeros padded into the log-mel (not silence) past the speech of a short window
    # made the decoder loop: beckett at a 10 s floor read back its phrases again (WER 1.5).
    short = CTranslate2Engine(engine._model, AsrSettings(min_window_s=10))
    [result] = short.decode([task(AsrOptions(word_timestamps=True, beam_size=1))])
    text = "".join(s.text for s in result.segments)
    assert wer(clips["beckett"].text, text) <= 0.1, text


def test_max_window_s_cuts_a_file_into_shorter_windows_of_its_speech(engine, clips):
    from pipeline.asr.ctranslate2 import CTranslate2Engine

    sample = load(clips["sample"])
    short = CTranslate2Engine(engine._model, AsrSettings(min_window_s=10, max_window_s=15))
    cut = short.cut(sample)
    assert len(cut) > len(engine.cut(sample))
    assert all(sum(b - a for a, b in w) <= 15 * 16000 for w in cut)
    # The same speech, in order, none of it twice.
    flat = [p for w in cut for p in w]
    assert all(a < b <= c for (a, b), (c, _) in zip(flat, flat[1:]))
    assert sum(b - a for a, b in flat) == sum(b - a for w in engine.cut(sample) for a, b in w)


def test_a_60_s_clip_alone_decodes_its_windows_in_one_step_in_the_language_of_the_first(engine, clips):
    # They used to wait for the first window's language in a step of their own: no batching of a
    # lone file's windows at all (0.90x the faster-whisper loop on the 60 s clip).
    sample = load(clips["sample"])
    sixty = type(sample)(np.concatenate([sample.samples, sample.samples]))
    steps = []
    decode_windows = engine.decode
    engine.decode = lambda tasks: steps.append([(t.request, t.language) for t in tasks]) or decode_windows(tasks)
    try:
        [t] = engine.transcribe([sixty], [AsrOptions(word_timestamps=True, beam_size=1)])
    finally:
        del engine.decode
    assert len(steps) == 1 and len(steps[0]) == 2 and {language for _, language in steps[0]} == {None}
    assert t.language == "en" and t.language_probability > 0.5
    assert wer(f"{clips['sample'].text} {clips['sample'].text}", t.text) <= 0.3, t.text
    assert all(0 <= w.start <= w.end <= sixty.duration_s for w in t.words)
    assert all(a.start <= b.start for a, b in zip(t.words, t.words[1:]))


def test_the_heap_goes_back_after_long_steps_only(engine, clips, monkeypatch):
    """After a step of long windows the freed heap goes back to the system (the ASR replica held
    ~100 MB more per 30 s window decoded); not after a short step, where it would cost a live
    stream ~30 ms."""
    import pipeline.asr.ctranslate2 as ct2

    assert ct2._malloc_trim is not None  # glibc here: the real call is made
    trims = []
    monkeypatch.setattr(ct2, "give_back_freed_heap", lambda: trims.append(1))
    sample = decode(clips["sample"].path, max_duration_s=60)
    engine.transcribe([Audio(sample.samples[: 3 * 16000])], [AsrOptions(language="en")])
    assert trims == []
    engine.transcribe([sample], [AsrOptions(language="en")])
    assert trims


def test_on_a_cpu_a_steps_windows_go_through_the_encoder_one_at_a_time(engine, clips):
    """An encoder call's working memory grows with its batch (~110 MB per 30 s window): on a CPU,
    where a batch gains no time, a step's windows go one by one. Same output as one batched call."""
    from faster_whisper.feature_extractor import FeatureExtractor

    from pipeline.asr.ctranslate2 import _Work

    sample = decode(clips["sample"].path, max_duration_s=60).samples
    mel = FeatureExtractor()(np.pad(sample[: 10 * 16000], (0, 20 * 16000)))[..., :3000]
    group = [_Work(task=None, features=mel, frames=1000), _Work(task=None, features=mel * 0.5, frames=1000)]
    whisper = engine._model
    batches = []
    real = whisper.encode
    whisper.encode = lambda features: batches.append(features.shape[0]) or real(features)
    try:
        one_by_one = np.asarray(engine._encode(group))
    finally:
        del whisper.encode
    assert batches == [1, 1]
    together = np.asarray(whisper.encode(np.stack([w.features for w in group])))
    assert one_by_one.shape == together.shape == (2, 1500, 512)
    np.testing.assert_allclose(one_by_one, together, atol=1e-4)
