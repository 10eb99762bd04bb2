"""Diarization scores: DER through pyannote.metrics (a dev/bench dependency) and word-speaker
accuracy against an STM transcript."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from pathlib import Path


def read_rttm(path: Path) -> list[tuple[str, float, float]]:
    """(speaker, start, end) of each SPEAKER line."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "SPEAKER":
            start, dur = float(parts[3]), float(parts[4])
            out.append((parts[7], start, start + dur))
    return out


def _annotation(turns: Iterable):
    from pyannote.core import Annotation, Segment

    ann = Annotation()
    for i, t in enumerate(turns):
        speaker, start, end = (t.speaker, t.start, t.end) if hasattr(t, "speaker") else t
        ann[Segment(start, end), i] = speaker
    return ann


def der(reference: Iterable, hypothesis: Iterable, collar_s: float) -> float:
    """DER with a no-score collar of ``collar_s`` on each side of every reference boundary
    (md-eval's convention; pyannote's ``collar`` is the total width, hence the doubling)."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    metric = DiarizationErrorRate(collar=2 * collar_s, skip_overlap=False)
    return float(metric(_annotation(reference), _annotation(hypothesis)))


def word_speaker_accuracy(words: Sequence, labels: Sequence[str], stm_path: Path) -> float:
    """Share of words whose speaker is right. A word's true speaker is the STM utterance holding
    its middle (the nearest one for words between utterances); each hypothesis label stands for
    the reference speaker it most often meets."""
    stm = [line.split(maxsplit=5) for line in Path(stm_path).read_text().splitlines()]
    spans = [(parts[2], float(parts[3]), float(parts[4])) for parts in stm]

    def truth(word) -> str:
        middle = (word.start + word.end) / 2
        return min(spans, key=lambda s: 0 if s[1] <= middle <= s[2] else min(abs(middle - s[1]), abs(middle - s[2])))[0]

    pairs = [(label, truth(w)) for w, label in zip(words, labels, strict=True)]
    mapping = {h: collections.Counter(r for hh, r in pairs if hh == h).most_common(1)[0][0] for h in set(labels)}
    return sum(mapping[h] == r for h, r in pairs) / len(pairs)
