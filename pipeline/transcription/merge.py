"""Words meet speakers: a pure merge of a transcript with a diarization.

Each word takes the speaker whose turn overlaps it most (WhisperX's rule); a word in a gap takes
the nearest turn. Labels are then renumbered by first appearance in the words, so the transcript
always starts with SPEAKER_00.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.core.types import SpeakerTurn
from pipeline.core.types import Word


def assign_word_speakers(words: Sequence[Word], turns: Sequence[SpeakerTurn]) -> tuple[str, ...]:
    """One label per word, ``SPEAKER_00``… in order of first appearance among the words."""
    if not words:
        return ()
    if not turns:
        return ("SPEAKER_00",) * len(words)
    raw = []
    for w in words:
        best, best_overlap = None, 0.0
        for t in turns:
            overlap = min(w.end, t.end) - max(w.start, t.start)
            if overlap > best_overlap:
                best, best_overlap = t, overlap
        if best is None:
            middle = (w.start + w.end) / 2
            best = min(turns, key=lambda t: 0.0 if t.start <= middle <= t.end else min(abs(middle - t.start), abs(middle - t.end)))
        raw.append(best.speaker)
    names: dict[str, str] = {}
    return tuple(names.setdefault(label, f"SPEAKER_{len(names):02d}") for label in raw)


def group_turns(words: Sequence[Word], labels: Sequence[str]) -> list[tuple[str, str, float, float]]:
    """Consecutive words of one speaker as one turn: (speaker, text, start, end)."""
    turns: list[tuple[str, list[Word]]] = []
    for word, label in zip(words, labels, strict=True):
        if turns and turns[-1][0] == label:
            turns[-1][1].append(word)
        else:
            turns.append((label, [word]))
    return [(label, "".join(w.text for w in ws).strip(), ws[0].start, ws[-1].end) for label, ws in turns]
