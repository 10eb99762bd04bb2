"""Long audio → windows of at most 30 s, cut at quiet points, with absolute offsets.

Whisper sees 30 s at a time. Engines that batch windows (transformers, vLLM) need the audio split
before decoding; cutting blindly every 30 s splits words, so cuts go where it is quiet: between
the speech regions a VAD found, or, inside a region longer than a window, at the quietest 20 ms
frame of the window's last third. Every window carries its real start and end in samples, so
offsets come from the audio itself and never drift (vLLM's own server accumulated nominal window
lengths and drifted: vllm-project/vllm#32588).
"""

from __future__ import annotations

import numpy as np

from pipeline.audio.vad import SpeechFinder
from pipeline.core.types import SAMPLE_RATE, as_float32

WINDOW_S = 30.0
_FRAME = SAMPLE_RATE // 50  # 20 ms


def quietest_cut(samples: np.ndarray, start: int, stop: int) -> int:
    """The start of the quietest 20 ms frame in ``samples[start:stop]`` (``stop`` if too short)."""
    frames = (stop - start) // _FRAME
    if frames < 1:
        return stop
    energy = np.square(as_float32(samples[start : start + frames * _FRAME]).reshape(frames, _FRAME)).mean(axis=1)
    return start + int(np.argmin(energy)) * _FRAME + _FRAME // 2


def split_span(samples: np.ndarray, start: int, end: int, window: int) -> list[tuple[int, int]]:
    """``[start, end)`` in pieces of at most ``window`` samples, cut at quiet points."""
    pieces = []
    while end - start > window:
        cut = quietest_cut(samples, start + (2 * window) // 3, start + window)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def with_speech(regions: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """A VAD's ``regions`` with ``[start, end)`` speech too: the regions after ``start`` go into it,
    and one that reaches into it joins it."""
    head = [(a, b) for a, b in regions if b < start]
    joined = min((a for a, b in regions if b >= start and a < end), default=start)
    return [*head, (min(joined, start), end)]


def windows(
    samples: np.ndarray, speech: SpeechFinder | None = None, window_s: float = WINDOW_S
) -> list[tuple[int, int]]:
    """Spans of at most ``window_s`` covering the speech in ``samples`` (all of it without a
    ``speech`` finder), in order, never overlapping. Silence between windows is left out."""
    window = int(window_s * SAMPLE_RATE)
    n = len(samples)
    if n == 0:
        return []
    regions = speech(samples) if speech is not None else [(0, n)]
    pieces = [p for s, e in regions if e > s for p in split_span(samples, max(0, s), min(n, e), window)]
    # Pack neighbouring pieces into one window while the whole span fits.
    # VAD regions may overlap once padded: a piece starts where the previous window ends.
    packed: list[tuple[int, int]] = []
    for start, end in pieces:
        if packed:
            start = max(start, packed[-1][1])
            if end <= start:
                continue  # wholly inside what is already covered
            if end - packed[-1][0] <= window:
                packed[-1] = (packed[-1][0], end)
                continue
        packed.append((start, end))
    return packed
