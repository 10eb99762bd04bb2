"""Every ASR engine on the real bundled model and real speech: one contract for all.

Engines under test come from ``HARK_TEST_ENGINES`` (default: ctranslate2,transformers); `.ci/run`
runs this file again with ``vllm`` inside the vLLM environment it builds.
"""

import os

import numpy as np
import pytest

from pipeline.audio.decode import decode
from pipeline.asr.base import AsrEngine
from pipeline.asr.factory import build_engine
from pipeline.core.errors import InvalidParameter
from pipeline.core.settings import AsrSettings
from pipeline.core.types import AsrOptions, Audio
from textnorm import wer

ESPEAK = ["fox", "stella", "meeting", "speech", "weather", "report"]


ENGINES = [e.strip() for e in os.environ.get("HARK_TEST_ENGINES", "ctranslate2,transformers").split(",") if e.strip()]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return build_engine(AsrSettings(engine=request.param))


def load(clip):
    return decode(clip.path, max_duration_s=7200)


def check_times(engine, transcript):
    """Segments (and words, where the engine times them) monotonic and inside the audio."""
    segments = transcript.segments
    for s in segments:
        assert 0.0 <= s.start <= s.end <= transcript.duration_s
    assert [s.start for s in segments] == sorted(s.start for s in segments)
    if engine.supports_word_timestamps:
        check_words(transcript)
    else:
        assert transcript.words == ()


def check_words(transcript):
    words = transcript.words
    assert words, "no words"
    for w in words:
        assert 0.0 <= w.start <= w.end <= transcript.duration_s
        assert 0.0 <= w.probability <= 1.0
    starts = [w.start for w in words]
    assert starts == sorted(starts)


def test_engine_implements_the_protocol(engine):
    assert isinstance(engine, AsrEngine)
    assert engine.supports_language_detection
    assert {"en", "es", "fr", "de", "zh"} <= engine.languages


def test_engine_refuses_what_it_cannot_do(engine):
    if engine.supports_word_timestamps:
        engine.check(AsrOptions(word_timestamps=True))
    else:
        with pytest.raises(InvalidParameter) as info:
            engine.check(AsrOptions(word_timestamps=True))
        assert info.value.to_body()["param"] == "timestamps"
    with pytest.raises(InvalidParameter):
        engine.check(AsrOptions(language="xx"))


def test_beckett_exact_and_batched_with_sample(engine, clips):
    beckett, sample = load(clips["beckett"]), load(clips["sample"])
    timed = engine.supports_word_timestamps
    options = [AsrOptions(word_timestamps=timed), AsrOptions(language="en", word_timestamps=timed)]
    out = engine.transcribe([beckett, sample], options)
    assert len(out) == 2
    assert wer(clips["beckett"].text, out[0].text) <= 0.1  # one word in twelve
    assert out[0].language == "en" and out[0].language_probability > 0.8
    assert wer(clips["sample"].text, out[1].text) < 0.25
    assert out[1].language_probability == 1.0  # given, not detected
    for t in out:
        check_times(engine, t)
        assert 0.5 < t.confidence <= 1.0


def test_espeak_sentences(engine, clips):
    audios = [load(clips[name]) for name in ESPEAK]
    out = engine.transcribe(audios, [AsrOptions()] * len(audios))
    errors = [wer(clips[name].text, t.text) for name, t in zip(ESPEAK, out)]
    assert np.mean(errors) < 0.2, list(zip(ESPEAK, errors, [t.text for t in out]))


@pytest.mark.parametrize("name, language", [("spanish", "es"), ("french", "fr")])
def test_language_detection(engine, clips, name, language):
    [t] = engine.transcribe([load(clips[name])], [AsrOptions()])
    assert t.language == language
    assert t.text


def test_silence_gives_no_words(engine):
    silence = Audio(np.zeros(16000 * 20, dtype=np.float32))
    [t] = engine.transcribe([silence], [AsrOptions(language="en")])
    assert t.text == "" and t.confidence == 0.0 and t.duration_s == 20.0


def test_long_audio_keeps_absolute_offsets(engine, clips):
    """beckett, 50 s of silence, beckett again: every window lands where its audio is."""
    beckett = load(clips["beckett"])
    gap = np.zeros(16000 * 50, dtype=np.float32)
    long = Audio(np.concatenate([beckett.samples, gap, beckett.samples]))
    second_start = beckett.duration_s + 50.0
    [t] = engine.transcribe([long], [AsrOptions(language="en", word_timestamps=engine.supports_word_timestamps)])
    check_times(engine, t)
    first = [s for s in t.segments if s.end <= beckett.duration_s + 0.5]
    second = [s for s in t.segments if s.start >= second_start - 0.5]
    assert first and second and len(first) + len(second) == len(t.segments), [(s.start, s.end) for s in t.segments]
    for part in (first, second):
        assert wer(clips["beckett"].text, "".join(s.text for s in part)) <= 0.1
    if engine.supports_word_timestamps:
        later = [w for w in t.words if w.start >= second_start - 0.5]
        assert later[0].start == pytest.approx(second_start + t.words[0].start, abs=0.5)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_english_only_model_refuses_other_languages(clips, engine_name):
    # A second vLLM engine in this process: vLLM's CPU memory check counts the first one's
    # memory against this one's share, so it gets a larger share.
    tiny = build_engine(
        AsrSettings(engine=engine_name, model="whisper-tiny.en", compute_type="int8", vllm_memory_utilization=0.45)
    )
    assert tiny.languages == frozenset({"en"})
    with pytest.raises(InvalidParameter) as info:
        tiny.check(AsrOptions(language="es"))
    assert info.value.to_body()["param"] == "language"
    [t] = tiny.transcribe([load(clips["beckett"])], [AsrOptions()])
    assert t.language == "en" and wer(clips["beckett"].text, t.text) < 0.2
