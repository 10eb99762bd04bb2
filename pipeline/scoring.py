"""Diarization error rate through pyannote.metrics (a dev/bench dependency)."""

from __future__ import annotations

from collections.abc import Iterable
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
