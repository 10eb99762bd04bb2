"""Word error rate with light normalisation (case, punctuation)."""

from __future__ import annotations

import jiwer

from pipeline.transcription.render import strip_punctuation


def wer(reference: str, hypothesis: str) -> float:
    return jiwer.wer(strip_punctuation(reference).replace("-", " "), strip_punctuation(hypothesis).replace("-", " "))


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """WER over all the words of several texts together (each error weighs the same, whatever
    the length of the text it is in)."""
    norm = [strip_punctuation(t).replace("-", " ") for t in references]
    return jiwer.wer(norm, [strip_punctuation(t).replace("-", " ") for t in hypotheses])
