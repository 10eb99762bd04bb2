"""From an engine's ``Transcript`` to the API's words and text, as ``API.md`` specifies.

Whisper attaches punctuation to words (" Hello,"). With ``punctuate`` each mark becomes its own
entry with ``start == end`` = the end of the word it follows, as ``API.md`` says: an opening mark
(``"``, ``(``, ``¿``) too, although it leads the next word; before the first word, the start of
the audio. Marks have confidence 1.0. Without ``punctuate``, marks are dropped and text is
lower-cased. Marks inside a word (don't, 3.5, e-mail) belong to the word.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from collections.abc import Sequence

from pipeline.transcription.merge import group_turns
from pipeline.transcription.schemas import ListenResponse, SpeakerTurnOut, WordOut
from pipeline.core.types import Transcript, Word


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


@dataclass(frozen=True)
class _Split:
    leading: str
    core: str
    trailing: str


def _split_marks(token: str) -> _Split:
    token = token.strip()
    i, j = 0, len(token)
    while i < j and _is_mark(token[i]):
        i += 1
    while j > i and _is_mark(token[j - 1]):
        j -= 1
    return _Split(token[:i], token[i:j], token[j:])


_INNER_MARKS = frozenset("'’‐-.,:/_")
_SENTENCE_END = frozenset(".?!…。？！")


def ends_sentence(text: str) -> bool:
    """Does a word, as Whisper writes it (its marks attached), end a sentence?"""
    return text.rstrip()[-1:] in _SENTENCE_END


def strip_punctuation(text: str) -> str:
    """Text without punctuation marks, lower-cased.

    A mark between two letters or digits is part of a word (don't, 3.5, 10,000, e-mail) and
    stays; every other mark goes, CJK marks included.
    """
    kept = []
    for i, ch in enumerate(text):
        if not _is_mark(ch):
            kept.append(ch)
        elif (
            ch in _INNER_MARKS
            and 0 < i < len(text) - 1
            and text[i - 1].isalnum()
            and text[i + 1].isalnum()
        ):
            kept.append(ch)
    return " ".join("".join(kept).split()).lower()


def api_words(
    words: Sequence[Word],
    punctuate: bool,
    speakers: Sequence[str] | None = None,
    *,
    previous_end_s: float = 0.0,
) -> list[WordOut]:
    """API word entries; ``speakers`` (one label per word) adds ``speaker`` to each entry,
    its punctuation marks included. ``previous_end_s`` is the end of the word before ``words``
    (where a stream's message continues earlier ones); 0.0 when they start the audio."""
    out: list[WordOut] = []
    followed_end = previous_end_s  # the end of the last word entry: where the next mark sits
    for i, w in enumerate(words):
        parts = _split_marks(w.text)
        confidence = round(w.probability, 4)
        who = speakers[i] if speakers is not None else None
        if not punctuate:
            bare = strip_punctuation(w.text)
            if bare:
                out.append(WordOut(word=bare, start=w.start, end=w.end, confidence=confidence, speaker=who))
            continue
        for mark in parts.leading:
            out.append(WordOut(word=mark, start=followed_end, end=followed_end, confidence=1.0, speaker=who))
        if parts.core:
            out.append(WordOut(word=parts.core, start=w.start, end=w.end, confidence=confidence, speaker=who))
            followed_end = w.end
        for mark in parts.trailing:
            out.append(WordOut(word=mark, start=followed_end, end=followed_end, confidence=1.0, speaker=who))
    return out


def render(
    transcript: Transcript,
    *,
    request_id: str,
    punctuate: bool,
    timestamps: bool,
    word_speakers: Sequence[str] | None = None,
    utterances: list[dict] | None = None,
    paragraphs: dict | None = None,
) -> ListenResponse:
    """The response body. ``word_speakers`` (one label per transcript word, from
    ``merge.assign_word_speakers``) adds ``speakers`` and a ``speaker`` on each word;
    ``utterances`` and ``paragraphs`` are Deepgram's groupings (``grouping``), when asked for."""
    text = transcript.text if punctuate else strip_punctuation(transcript.text)
    speakers = None
    if word_speakers is not None:
        speakers = [
            SpeakerTurnOut(speaker=who, text=said if punctuate else strip_punctuation(said), start=start, end=end)
            for who, said, start, end in group_turns(transcript.words, word_speakers)
        ]
    return ListenResponse(
        request_id=request_id,
        text=text,
        confidence=round(transcript.confidence, 4),
        duration=round(transcript.duration_s, 3),
        language=transcript.language,
        words=api_words(transcript.words, punctuate, word_speakers) if timestamps else None,
        speakers=speakers,
        utterances=utterances,
        paragraphs=paragraphs,
    )
