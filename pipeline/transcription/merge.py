"""Words meet speakers: a pure merge of a transcript with a diarization.

Each word takes the speaker whose turn overlaps it most (WhisperX's rule); a word in a gap takes
the nearest turn. Labels are then renumbered by first appearance in the words, so the transcript
always starts with SPEAKER_00.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.core.types import SpeakerTurn
from pipeline.core.types import Word


def assign_word_speakers(words: Sequence[Word], turns: Sequence[SpeakerTurn]) -> tuple[str, ...]:
    """One label per word, ``SPEAKER_00``… in order of first appearance among the words.

    Vectorised over blocks of words: a 2 h meeting (~20 000 words, ~2 000 turns) takes a fraction
    of a second, where the word-by-turn loop took tens of seconds."""
    if not words:
        return ()
    if not turns:
        return ("SPEAKER_00",) * len(words)
    word_start = np.fromiter((w.start for w in words), float, len(words))
    word_end = np.fromiter((w.end for w in words), float, len(words))
    turn_start = np.fromiter((t.start for t in turns), float, len(turns))[None, :]
    turn_end = np.fromiter((t.end for t in turns), float, len(turns))[None, :]
    chosen = np.empty(len(words), dtype=np.int64)
    for lo in range(0, len(words), _BLOCK):
        start, end = word_start[lo:lo + _BLOCK, None], word_end[lo:lo + _BLOCK, None]
        overlap = np.minimum(end, turn_end) - np.maximum(start, turn_start)
        most = overlap.argmax(axis=1)  # the first turn of largest overlap, as the loop chose
        overlaps = overlap[np.arange(len(most)), most] > 0
        # A word in a gap: the nearest turn (0 for a turn around its middle).
        middle = (start + end) / 2
        inside = (turn_start <= middle) & (middle <= turn_end)
        distance = np.where(inside, 0.0, np.minimum(np.abs(middle - turn_start), np.abs(middle - turn_end)))
        chosen[lo:lo + _BLOCK] = np.where(overlaps, most, distance.argmin(axis=1))
    names: dict[str, str] = {}
    return tuple(names.setdefault(turns[i].speaker, f"SPEAKER_{len(names):02d}") for i in chosen.tolist())


_BLOCK = 512


def group_turns(words: Sequence[Word], labels: Sequence[str]) -> list[tuple[str, str, float, float]]:
    """Consecutive words of one speaker as one turn: (speaker, text, start, end)."""
    turns: list[tuple[str, list[Word]]] = []
    for word, label in zip(words, labels, strict=True):
        if turns and turns[-1][0] == label:
            turns[-1][1].append(word)
        else:
            turns.append((label, [word]))
    return [(label, "".join(w.text for w in ws).strip(), ws[0].start, ws[-1].end) for label, ws in turns]
