import asyncio

import numpy as np
import pytest

from pipeline.transcription.render import api_words, render, strip_punctuation
from pipeline.transcription.schemas import ListenParams
from pipeline.core.errors import InvalidParameter
from pipeline.core.types import SAMPLE_RATE, Segment, Transcript, Word
from pipeline.streaming.session import StreamingSession, StreamOptions

WORDS = (
    Word(" Hello,", 0.0, 0.5, 0.9),
    Word(" this", 0.6, 0.8, 0.8),
    Word(" isn't", 0.8, 1.0, 0.7),
    Word(' "quoted"', 1.1, 1.5, 0.6),
    Word(" 3.5", 1.6, 2.0, 0.5),
    Word(" percent.", 2.0, 2.4, 0.4),
)
TRANSCRIPT = Transcript(
    segments=(Segment(text="".join(w.text for w in WORDS), start=0.0, end=2.4, avg_logprob=-0.3, num_tokens=9, words=WORDS),),
    language="en",
    language_probability=0.98,
    duration_s=3.0,
)


def test_punctuation_marks_become_their_own_entries():
    words = api_words(WORDS, punctuate=True)
    assert [w.word for w in words] == ["Hello", ",", "this", "isn't", '"', "quoted", '"', "3.5", "percent", "."]
    comma = words[1]
    assert (comma.start, comma.end, comma.confidence) == (0.5, 0.5, 1.0)  # end of the word it follows
    opening = words[4]
    assert (opening.start, opening.end) == (1.0, 1.0)  # an opening mark too: the end of "isn't"
    assert words[0].confidence == 0.9 and (words[0].start, words[0].end) == (0.0, 0.5)


def test_opening_marks_sit_at_the_end_of_the_word_they_follow():
    """Regression (review finding 15): opening marks were timed at the start of the word they
    lead. API.md: each mark has ``start == end``, the end of the word it follows."""
    words = (
        Word(" ¿Qué", 0.4, 0.7, 0.9),
        Word(" dijo?", 0.8, 1.2, 0.9),
        Word(' "(¡Hola!)"', 1.5, 2.0, 0.8),
        Word(" [risas]", 2.3, 2.9, 0.7),
        Word(" “fin”.", 3.2, 3.6, 0.6),
        Word(" -", 3.7, 3.8, 0.5),  # a mark alone follows the word before it too
        Word(" 'ok'", 4.0, 4.4, 0.5),
    )
    out = [(w.word, w.start, w.end) for w in api_words(words, punctuate=True)]
    assert out == [
        ("¿", 0.0, 0.0),  # no word before it: the start of the audio
        ("Qué", 0.4, 0.7),
        ("dijo", 0.8, 1.2), ("?", 1.2, 1.2),
        ('"', 1.2, 1.2), ("(", 1.2, 1.2), ("¡", 1.2, 1.2), ("Hola", 1.5, 2.0), ("!", 2.0, 2.0), (")", 2.0, 2.0), ('"', 2.0, 2.0),
        ("[", 2.0, 2.0), ("risas", 2.3, 2.9), ("]", 2.9, 2.9),
        ("“", 2.9, 2.9), ("fin", 3.2, 3.6), ("”", 3.6, 3.6), (".", 3.6, 3.6),
        ("-", 3.6, 3.6),
        ("'", 3.6, 3.6), ("ok", 4.0, 4.4), ("'", 4.4, 4.4),
    ]
    starts = [start for _, start, _ in out]
    assert starts == sorted(starts)
    # Words that continue a stream: the first mark follows the last word already sent.
    [mark, word] = api_words((Word(" (yes", 7.5, 7.9, 0.9),), punctuate=True, previous_end_s=6.25)
    assert (mark.word, mark.start, mark.end, word.start) == ("(", 6.25, 6.25, 7.5)


def test_a_stream_times_an_opening_mark_at_the_end_of_the_last_word_sent():
    """The same rule across the messages of a stream: a quote opening the second utterance sits
    at the end of the first utterance's last word."""
    said = [(Word(" Hello.", 0.2, 0.6, 0.9),), (Word(' "Hi"', 0.3, 0.7, 0.9),)]

    async def transcribe(audio, options):
        # Each utterance is 1 s; a decode (interim or final) of the second hears the first before
        # it (left context), so it is 2 s long.
        offset = audio.duration_s - 1.0
        words = tuple(Word(w.text, w.start + offset, w.end + offset, w.probability) for w in said[int(offset > 0)])
        return Transcript((Segment(words[0].text, 0.0, audio.duration_s, -0.1, 2, words),), "en", 1.0, audio.duration_s)

    session = StreamingSession(transcribe, StreamOptions(interim_results=False), vad=lambda s: [(0, len(s))])
    speech = np.full(SAMPLE_RATE, 0.1, np.float32)

    async def two_utterances():
        return [
            *await session.feed(speech), *await session.finish(),
            *await session.feed(speech), *await session.finish(),
        ]

    first, second = asyncio.run(two_utterances())
    assert [w["word"] for w in first["words"]] == ["Hello", "."]
    assert second["words"][0] == {"word": '"', "start": 0.6, "end": 0.6, "confidence": 1.0}
    assert (second["words"][1]["word"], second["words"][1]["start"]) == ("Hi", 1.3)


def test_without_punctuation_marks_drop_and_case_lowers():
    words = api_words(WORDS, punctuate=False)
    assert [w.word for w in words] == ["hello", "this", "isn't", "quoted", "3.5", "percent"]
    assert strip_punctuation('Hello, world! "Quoted" 10,000 e-mail ¿Qué? 你好，世界。') == (
        "hello world quoted 10,000 e-mail qué 你好世界"
    )


def test_render_shapes_the_api_body():
    body = render(TRANSCRIPT, request_id="req_1", punctuate=True, timestamps=False).to_json()
    assert body == {
        "request_id": "req_1",
        "text": 'Hello, this isn\'t "quoted" 3.5 percent.',
        "confidence": pytest.approx(sum(w.probability for w in WORDS) / len(WORDS), abs=1e-4),
        "duration": 3.0,
        "language": "en",
    }
    body = render(TRANSCRIPT, request_id="req_1", punctuate=False, timestamps=True).to_json()
    assert body["text"] == "hello this isn't quoted 3.5 percent"
    assert len(body["words"]) == 6 and "speakers" not in body and "speaker" not in body["words"][0]


def test_confidence_without_words_and_of_silence():
    no_words = Transcript((Segment(" Hi.", 0, 1, -0.1, 3),), "en", 1.0, 1.0)
    assert no_words.confidence == pytest.approx(0.9048, abs=1e-3)
    assert Transcript((), "en", 1.0, 5.0).confidence == 0.0


def test_num_speakers_is_ignored_without_diarize():
    assert ListenParams.parse({"num_speakers": "0"}).num_speakers is None
    assert ListenParams.parse({"diarize": "true", "num_speakers": "3"}).num_speakers == 3


def test_params_parse_strings_from_query_and_forms():
    p = ListenParams.parse({"language": "en-US", "punctuate": "false", "timestamps": "1", "diarize": "on", "num_speakers": "2", "model": "nova-2"})
    assert (p.language, p.punctuate, p.timestamps, p.num_speakers) == ("en", False, True, 2)
    assert p.asr_options().language == "en"
    assert ListenParams.parse({}).language is None and ListenParams.parse({"language": ""}).language is None


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"language": "xx"}, "language"),
        ({"language": 5}, "language"),
        ({"punctuate": "maybe"}, "punctuate"),
        ({"timestamps": [1]}, "timestamps"),
        ({"diarize": "true", "num_speakers": "0"}, "num_speakers"),
        ({"diarize": True, "num_speakers": 33}, "num_speakers"),
        ({"num_speakers": "two"}, "num_speakers"),
        ({"diarize": "yes please"}, "diarize"),
    ],
)
def test_params_refuse_bad_values_naming_the_field(fields, param):
    with pytest.raises(InvalidParameter) as info:
        ListenParams.parse(fields)
    assert info.value.to_body()["param"] == param
