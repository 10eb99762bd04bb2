"""Deepgram's utterances and paragraphs, on synthetic words, and their place in the /v1/listen body."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.core.errors import InvalidParameter
from pipeline.core.types import Audio, Diarization, Segment, SpeakerTurn, Transcript, Word
from pipeline.transcription.flow import TranscriptionFlow
from pipeline.transcription.grouping import paragraphs, utterances
from pipeline.transcription.render import render
from pipeline.transcription.schemas import ListenParams
from pipeline.transcription.subtitles import render_body

# "Hello there. How are you?" (A) | 1 s pause | "Fine, thanks." (B) | 2.5 s pause | "Good." (B)
WORDS = (
    Word(" Hello", 0.0, 0.3, 0.9), Word(" there.", 0.35, 0.7, 0.8), Word(" How", 0.8, 1.0, 1.0),
    Word(" are", 1.0, 1.1, 1.0), Word(" you?", 1.1, 1.4, 0.7),
    Word(" Fine,", 2.4, 2.7, 0.6), Word(" thanks.", 2.75, 3.0, 1.0),
    Word(" Good.", 5.5, 5.8, 0.5),
)
SPEAKERS = ("SPEAKER_00",) * 5 + ("SPEAKER_01",) * 3
TRANSCRIPT = Transcript((Segment("".join(w.text for w in WORDS), 0.0, 5.8, -0.2, 12, WORDS),), "en", 1.0, 6.0)


def test_utterances_split_on_pauses_and_speakers():
    utts = utterances(WORDS, None, utt_split_s=1.2)
    assert [u["transcript"] for u in utts] == ["Hello there. How are you? Fine, thanks.", "Good."]
    utts = utterances(WORDS, None)  # Deepgram's 0.8 s
    assert [u["transcript"] for u in utts] == ["Hello there. How are you?", "Fine, thanks.", "Good."]
    assert utts[0]["confidence"] == pytest.approx((0.9 + 0.8 + 1 + 1 + 0.7) / 5, abs=1e-4)
    assert (utts[1]["start"], utts[1]["end"], utts[1]["channel"]) == (2.4, 3.0, 0)
    assert [w["word"] for w in utts[1]["words"]] == ["Fine", ",", "thanks", "."]
    diarized = utterances(WORDS, SPEAKERS, utt_split_s=0.8)
    assert [(u["speaker"], u["transcript"]) for u in diarized] == [
        ("SPEAKER_00", "Hello there. How are you?"), ("SPEAKER_01", "Fine, thanks."), ("SPEAKER_01", "Good.")]
    assert all(w["speaker"] == u["speaker"] for u in diarized for w in u["words"])
    assert utterances(WORDS, None, utt_split_s=1.2, punctuate=False)[0]["transcript"] == "hello there how are you fine thanks"


def test_paragraphs_hold_sentences_and_a_readable_transcript():
    plain = paragraphs(WORDS, None)
    assert [[s["text"] for s in p["sentences"]] for p in plain["paragraphs"]] == [
        ["Hello there.", "How are you?", "Fine, thanks."], ["Good."]]
    assert [p["num_words"] for p in plain["paragraphs"]] == [7, 1]
    assert plain["transcript"] == "\nHello there. How are you? Fine, thanks.\n\nGood.\n"
    diarized = paragraphs(WORDS, SPEAKERS)
    assert [p["speaker"] for p in diarized["paragraphs"]] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_01"]
    assert diarized["transcript"].startswith("\nSpeaker 0: Hello there. How are you?\n\nSpeaker 1: Fine, thanks.\n")


def test_listen_body_and_params():
    params = ListenParams.parse({"utterances": "true", "utt_split": "0.5", "paragraphs": "true"})
    assert params.asr_options().word_timestamps is True
    body = render(TRANSCRIPT, request_id="req_1", punctuate=True, timestamps=False,
                  utterances=utterances(WORDS, None, utt_split_s=params.utt_split),
                  paragraphs=paragraphs(WORDS, None)).to_json()
    assert "words" not in body and len(body["utterances"]) == 3 and len(body["paragraphs"]["paragraphs"]) == 2
    # A stored result with utterances but no words still makes subtitles.
    assert render_body(body, "srt").count("-->") == 4
    with pytest.raises(InvalidParameter) as err:
        ListenParams.parse({"utt_split": "0"})
    assert err.value.extra["param"] == "utt_split"
    assert "utterances" not in render(TRANSCRIPT, request_id="r", punctuate=True, timestamps=True).to_json()


def test_the_flow_adds_them_diarized_when_asked():
    class Recognizer:  # the flow's Protocol seam
        async def capabilities(self):
            raise AssertionError("not asked by run()")

        async def transcribe(self, audio, options):
            assert options.word_timestamps  # groupings need word times
            return TRANSCRIPT

    class Speakers:
        async def check(self):
            return None

        async def diarize(self, audio, num_speakers):
            return Diarization((SpeakerTurn("x", 0.0, 1.6), SpeakerTurn("y", 2.2, 6.0)))

    params = ListenParams.parse({"utterances": "true", "paragraphs": "true", "diarize": "true"})
    result = asyncio.run(TranscriptionFlow(Recognizer(), Speakers()).run(
        Audio(np.zeros(16000, np.float32)), params, request_id="req_1"))
    assert [(u["speaker"], u["transcript"]) for u in result.body["utterances"]] == [
        ("SPEAKER_00", "Hello there. How are you?"), ("SPEAKER_01", "Fine, thanks."), ("SPEAKER_01", "Good.")]
    assert result.body["paragraphs"]["transcript"].startswith("\nSpeaker 0: Hello there.")
    assert result.word_speakers == SPEAKERS
