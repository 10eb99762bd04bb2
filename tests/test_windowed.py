"""The logic the batching engines share, above the engine seam: a fake model behind
``WindowedEngine._detect``/``_decode`` (the real ones run in tests/test_engine.py)."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.asr.chunking import windows
from pipeline.asr.windowed import Decoded, WhisperTokens, WindowedEngine
from pipeline.asr.models import resolve_model
from pipeline.core.errors import InvalidParameter
from pipeline.core.settings import AsrSettings
from pipeline.core.types import AsrOptions, Audio

SR = 16000


@pytest.fixture(scope="module")
def tokens():
    model = Path(resolve_model("whisper-base", AsrSettings().resolved_model_cache_dir))
    return WhisperTokens(model / "tokenizer.json", 51865)


class FakeEngine(WindowedEngine):
    """Says ``script[temperature]`` for every window: tokens timed 0.1 s apart."""

    def __init__(self, tokens, script, **settings):
        super().__init__(tokens, AsrSettings(vad_filter=False, **settings))
        self.script, self.calls = script, []

    def _detect(self, first_windows):
        return [("fr", 0.9) for _ in first_windows]

    def _decode(self, windows, temperature):
        self.calls.append((temperature, len(windows)))
        text, logprob = self.script[temperature]
        ids = self._tokens.tokenizer.encode(text, add_special_tokens=False).ids
        return [
            Decoded(tokens=ids, probabilities=[0.8] * len(ids), times=[0.1 * i for i in range(len(ids) + 1)], avg_logprob=logprob)
            for _ in windows
        ]


def words_of(engine, text, language="en"):
    return words_of_ids(engine, engine._tokens.tokenizer.encode(text, add_special_tokens=False).ids, language)


def words_of_ids(engine, ids, language="en"):
    result = Decoded(tokens=ids, probabilities=[0.5] * len(ids), times=[0.1 * i for i in range(len(ids) + 1)], avg_logprob=0.0)
    return [w.text for w in engine._words(language, result, 0.0, 1e9)]


@pytest.mark.parametrize(
    "text, expected",
    [
        (' He said "yes" and paid $5.', [" He", " said", ' "yes"', " and", " paid", " $5."]),
        (" I know (really) - ok", [" I", " know", " (really)", " - ok"]),
        (" naïve café 日本語", [" naïve", " café", " 日本語"]),
    ],
)
def test_words_keep_punctuation_with_their_word(tokens, text, expected):
    assert words_of(FakeEngine(tokens, {}), text) == expected


def test_a_stray_byte_does_not_swallow_the_words_after_it(tokens):
    engine = FakeEngine(tokens, {})
    ids = tokens.tokenizer.encode(" a", add_special_tokens=False).ids + [128] + tokens.tokenizer.encode(" b c", add_special_tokens=False).ids
    assert [w.strip() for w in words_of_ids(engine, ids)][1:] == ["b", "c"]


def test_unspaced_scripts_get_a_word_per_token_group(tokens):
    words = words_of(FakeEngine(tokens, {}), "日本語です。", "ja")
    assert "".join(words) == "日本語です。" and len(words) >= 3
    assert words_of(FakeEngine(tokens, {}), "日本語です。", "en") == ["日本語です。"]  # spaced languages: one


def test_windows_carry_their_absolute_offsets_and_language(tokens):
    engine = FakeEngine(tokens, {0.0: (" Hello world.", -0.2)})
    audio = Audio(np.full(SR * 70, 0.1, np.float32))  # no speech finder: 3 windows, cut evenly here
    [t] = engine.transcribe([audio], [AsrOptions(word_timestamps=True)])
    spans = windows(audio.samples)
    assert [round(s.start, 3) for s in t.segments] == [round(a / SR, 3) for a, _ in spans]
    assert t.language == "fr" and t.language_probability == 0.9  # detected once, on the first window
    assert all(w.start >= s.start for s in t.segments for w in s.words)
    [given] = engine.transcribe([audio], [AsrOptions(language="de")])
    assert given.language == "de" and given.language_probability == 1.0


def test_degenerate_windows_are_decoded_again_hotter(tokens):
    loop = " la" * 60
    engine = FakeEngine(tokens, {0.0: (loop, -0.1), 0.2: (loop, -0.1), 0.4: (" A fine sentence.", -0.3)})
    [t] = engine.transcribe([Audio(np.ones(SR * 5, np.float32))], [AsrOptions()])
    assert t.text == "A fine sentence."
    assert [c[0] for c in engine.calls] == [0.0, 0.2, 0.4]
    engine.calls.clear()
    [t] = engine.transcribe([Audio(np.ones(SR * 5, np.float32))], [AsrOptions(temperature_fallback=False)])
    assert t.text == loop.strip() and [c[0] for c in engine.calls] == [0.0]


def test_overlapping_or_nested_speech_regions_give_disjoint_windows():
    audio = np.ones(SR * 40, np.float32)
    spans = windows(audio, speech=lambda s: [(0, 470000), (465000, 500000)])
    assert spans == [(0, 470000), (470000, 500000)]
    nested = windows(audio, speech=lambda s: [(0, 100000), (50000, 80000)])
    assert nested == [(0, 100000)]


def test_translate_task_and_a_starting_temperature_reach_the_decoder(tokens):
    vocab = tokens.tokenizer.get_vocab(with_added_tokens=True)
    prompt = tokens.prompt("es", None, "translate")
    assert prompt[-2:] == [vocab["<|translate|>"], vocab["<|notimestamps|>"]] and vocab["<|es|>"] in prompt
    assert vocab["<|transcribe|>"] in tokens.prompt("es", None)
    engine = FakeEngine(tokens, {0.0: (" Hello.", -0.2), 0.6: (" Hello.", -0.2)})
    audio = Audio(np.ones(SR * 2, np.float32))
    engine.transcribe([audio, audio], [AsrOptions(task="translate"), AsrOptions(temperature=0.6)])
    # One decoding call per requested temperature, each with its own windows.
    assert engine.calls == [(0.0, 1), (0.6, 1)]
    english_only = FakeEngine(WhisperTokens(tokens_path(), 51864), {0.0: (" Hello.", -0.2)})
    with pytest.raises(InvalidParameter) as err:
        english_only.transcribe([audio], [AsrOptions(language="en", task="translate")])
    assert err.value.extra["param"] == "task"


def tokens_path():
    return Path(resolve_model("whisper-base", AsrSettings().resolved_model_cache_dir)) / "tokenizer.json"
