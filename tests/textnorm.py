"""Word error rate with light normalisation (case, punctuation)."""

from __future__ import annotations

import jiwer

from pipeline.transcription.render import strip_punctuation


def wer(reference: str, hypothesis: str) -> float:
    return jiwer.wer(strip_punctuation(reference).replace("-", " "), strip_punctuation(hypothesis).replace("-", " "))
