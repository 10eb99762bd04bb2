"""The CTranslate2 engine on the real bundled models and real speech."""

import numpy as np
import pytest

from pipeline.audio import decode
from pipeline.engines import AsrEngine, build_engine
from pipeline.errors import InvalidParameter
from pipeline.settings import AsrSettings
from pipeline.types import AsrOptions, Audio
from textnorm import wer

ESPEAK = ["fox", "stella", "meeting", "speech", "weather", "report"]


@pytest.fixture(scope="module")
def engine():
    return build_engine(AsrSettings())


def load(clip):
    return decode(clip.path, max_duration_s=7200)


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
    assert engine.supports_word_timestamps and engine.supports_language_detection
    assert {"en", "es", "fr", "de", "zh"} <= engine.languages


def test_beckett_exact_and_batched_with_sample(engine, clips):
    beckett, sample = load(clips["beckett"]), load(clips["sample"])
    out = engine.transcribe([beckett, sample], [AsrOptions(), AsrOptions(language="en")])
    assert len(out) == 2
    assert wer(clips["beckett"].text, out[0].text) == 0.0
    assert out[0].language == "en" and out[0].language_probability > 0.8
    assert wer(clips["sample"].text, out[1].text) < 0.25
    assert out[1].language_probability == 1.0  # given, not detected
    for t in out:
        check_words(t)
        assert 0.5 < t.confidence <= 1.0


def test_espeak_sentences(engine, clips):
    audios = [load(clips[name]) for name in ESPEAK]
    out = engine.transcribe(audios, [AsrOptions()] * len(audios))
    errors = [wer(clips[name].text, t.text) for name, t in zip(ESPEAK, out)]
    assert np.mean(errors) < 0.15, list(zip(ESPEAK, errors, [t.text for t in out]))


@pytest.mark.parametrize("name, language", [("spanish", "es"), ("french", "fr")])
def test_language_detection(engine, clips, name, language):
    [t] = engine.transcribe([load(clips[name])], [AsrOptions()])
    assert t.language == language
    assert t.text


def test_silence_gives_no_words(engine):
    silence = Audio(np.zeros(16000 * 20, dtype=np.float32))
    [t] = engine.transcribe([silence], [AsrOptions(language="en")])
    assert t.text == "" and t.confidence == 0.0 and t.duration_s == 20.0


def test_english_only_model_refuses_other_languages(clips):
    tiny = build_engine(AsrSettings(model="whisper-tiny.en", compute_type="int8"))
    assert tiny.languages == frozenset({"en"})
    with pytest.raises(InvalidParameter) as info:
        tiny.check(AsrOptions(language="es"))
    assert info.value.to_body()["param"] == "language"
    [t] = tiny.transcribe([load(clips["beckett"])], [AsrOptions()])
    assert t.language == "en" and wer(clips["beckett"].text, t.text) < 0.2
