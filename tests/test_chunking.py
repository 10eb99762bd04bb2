"""Windows for the batching engines: at most 30 s, cut where it is quiet, real offsets."""

import numpy as np
import pytest

from pipeline.asr.chunking import quietest_cut, windows, with_speech
from pipeline.asr.base import Capabilities
from pipeline.core.errors import InvalidParameter

SR = 16000


def tone(seconds, amplitude=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_a_long_region_is_cut_at_its_quietest_point():
    # 50 s of tone with a 0.1 s dip at 24.0 s: the first window ends inside the dip.
    audio = tone(50)
    audio[24 * SR : int(24.1 * SR)] *= 0.01
    spans = windows(audio)
    assert spans[0][0] == 0 and 24.0 <= spans[0][1] / SR <= 24.1
    assert spans[-1][1] == len(audio)
    assert all(b - a <= 30 * SR for a, b in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))  # contiguous, no overlap


def test_speech_regions_are_packed_and_silence_left_out():
    audio = tone(100)
    regions = [(1 * SR, 5 * SR), (8 * SR, 20 * SR), (25 * SR, 40 * SR), (70 * SR, 75 * SR)]
    spans = windows(audio, speech=lambda samples: regions)
    assert spans == [(1 * SR, 20 * SR), (25 * SR, 40 * SR), (70 * SR, 75 * SR)]


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (25, [(0, 10), (20, 60)]),  # a region that reaches into the speech joins it; later ones go into it
        (30, [(0, 10), (20, 60)]),  # one that ends where it starts too
        (35, [(0, 10), (20, 30), (35, 60)]),
        (5, [(0, 60)]),
        (55, [(0, 10), (20, 30), (40, 50), (55, 60)]),
    ],
)
def test_a_stretch_known_to_be_speech_is_kept_whole_beside_the_vad_regions(start, expected):
    assert with_speech([(0, 10), (20, 30), (40, 50)], start, 60) == expected
    assert with_speech([], start, 60) == [(start, 60)]


def test_edge_cases():
    assert windows(np.zeros(0, np.float32)) == []
    assert windows(tone(3)) == [(0, 3 * SR)]
    assert quietest_cut(tone(1), 100, 120) == 120  # shorter than a frame: cut at the end


CAPS = Capabilities(engine="vllm", word_timestamps=False, language_detection=True, languages=frozenset({"en", "fr"}))


@pytest.mark.parametrize(
    "options, param",
    [
        ({"language": "de"}, "language"),
        ({"language": None, "timestamps": True}, "timestamps"),
        ({"language": "en", "diarize": True}, "diarize"),
        ({"language": None, "streaming": True}, "encoding"),
    ],
)
def test_capabilities_refuse_what_the_engine_cannot_honour(options, param):
    with pytest.raises(InvalidParameter) as info:
        CAPS.refuse_unsupported(**options)
    assert info.value.to_body()["param"] == param


def test_capabilities_accept_the_rest():
    CAPS.refuse_unsupported(language="fr")
    CAPS.refuse_unsupported(language=None)
    full = Capabilities("ctranslate2", True, True, frozenset({"en"}))
    full.refuse_unsupported(language=None, timestamps=True, diarize=True, streaming=True)
    with pytest.raises(InvalidParameter, match="English-only"):
        full.refuse_unsupported(language="fr")
