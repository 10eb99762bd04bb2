"""Deepgram's groupings of a transcript's words: ``utterances`` (split on pauses of ``utt_split``
seconds and on speaker changes) and ``paragraphs`` (sentences, broken on speaker changes and long
pauses). Pure functions of the engine's words and their speakers.

Shapes follow Deepgram's pre-recorded response; ``speaker`` is Hark's label (``SPEAKER_00``, as on
words and turns) rather than Deepgram's integer, and there is one channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.core.types import Word
from pipeline.transcription.render import api_words, ends_sentence, strip_punctuation
from pipeline.transcription.subtitles import speaker_name

UTT_SPLIT_S = 0.8  # Deepgram's default pause that ends an utterance
PARAGRAPH_PAUSE_S = 2.0  # a silence this long starts a new paragraph


def _runs(words: Sequence[Word], speakers: Sequence[str] | None, pause_s: float) -> list[list[int]]:
    """Indices of consecutive words, broken where the speaker changes or a pause exceeds ``pause_s``."""
    runs: list[list[int]] = []
    for i, w in enumerate(words):
        if (not runs or w.start - words[i - 1].end > pause_s
                or (speakers is not None and speakers[i] != speakers[i - 1])):
            runs.append([i])
        else:
            runs[-1].append(i)
    return runs


def _text(words: Sequence[Word], punctuate: bool) -> str:
    text = "".join(w.text for w in words).strip()
    return text if punctuate else strip_punctuation(text)


def utterances(words: Sequence[Word], speakers: Sequence[str] | None, *, utt_split_s: float = UTT_SPLIT_S,
               punctuate: bool = True) -> list[dict[str, Any]]:
    """Deepgram's ``utterances``: id, start, end, confidence (mean word probability), channel,
    transcript, words (as the API's ``words``), and speaker when diarized."""
    out = []
    for n, run in enumerate(_runs(words, speakers, utt_split_s)):
        ws = [words[i] for i in run]
        who = [speakers[i] for i in run] if speakers is not None else None
        utt: dict[str, Any] = {
            "id": f"utt_{n}",
            "start": ws[0].start,
            "end": ws[-1].end,
            "confidence": round(sum(w.probability for w in ws) / len(ws), 4),
            "channel": 0,
            "transcript": _text(ws, punctuate),
            "words": [w.model_dump(exclude_none=True) for w in api_words(ws, punctuate, who, previous_end_s=ws[0].start)],
        }
        if who is not None:
            utt["speaker"] = who[0]
        out.append(utt)
    return out


def paragraphs(words: Sequence[Word], speakers: Sequence[str] | None, *, punctuate: bool = True) -> dict[str, Any]:
    """Deepgram's ``paragraphs``: ``{"transcript", "paragraphs": [{"sentences": [{"text", "start",
    "end"}], "num_words", "start", "end", "speaker"?}]}``; the transcript puts a blank line between
    paragraphs and, diarized, ``Speaker N:`` before each."""
    out, lines = [], []
    for run in _runs(words, speakers, PARAGRAPH_PAUSE_S):
        sentences, current = [], []
        for i in run:
            current.append(words[i])
            if ends_sentence(words[i].text):
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
        paragraph: dict[str, Any] = {
            "sentences": [{"text": _text(s, punctuate), "start": s[0].start, "end": s[-1].end} for s in sentences],
            "num_words": sum(1 for i in run if strip_punctuation(words[i].text)),
            "start": words[run[0]].start,
            "end": words[run[-1]].end,
        }
        text = " ".join(s["text"] for s in paragraph["sentences"])
        if speakers is not None:
            paragraph["speaker"] = speakers[run[0]]
            text = f"{speaker_name(speakers[run[0]])}: {text}"
        out.append(paragraph)
        lines.append(text)
    return {"transcript": "".join(f"\n{line}\n" for line in lines), "paragraphs": out}
