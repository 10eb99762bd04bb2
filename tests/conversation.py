"""A three-voice conversation spoken by espeak-ng, with its exact reference turns."""

from __future__ import annotations

import numpy as np

import assets
from pipeline.audio.decode import decode
from pipeline.core.types import SAMPLE_RATE, Audio

VOICES = {"alice": "en-us+f3", "bob": "en-us+m3", "carol": "en-gb+f5"}
LINES = [
    ("alice", "Good morning everyone, thanks for joining the planning call today."),
    ("bob", "Morning. I have the numbers from last quarter ready to share."),
    ("carol", "Great, and I can walk through the hiring plan after that."),
    ("alice", "Let's start with the numbers then, Bob, go ahead please."),
    ("bob", "Revenue grew by twelve percent, mostly from the new customers in Europe."),
    ("carol", "That matches what the sales team told me last week."),
    ("bob", "Costs stayed flat, so the margin improved as well."),
    ("alice", "Excellent. Carol, what does hiring look like for the next quarter?"),
    ("carol", "We plan to add four engineers and one designer before the summer."),
    ("alice", "Sounds good. Let's meet again next Tuesday to review the details."),
]
GAP_S = 0.4


def build() -> tuple[Audio, list[tuple[str, float, float]]]:
    pieces, reference, t = [], [], 0.0
    for i, (speaker, text) in enumerate(LINES):
        path = assets._speak(f"conv-{i:02d}-{speaker}", VOICES[speaker], text)
        samples = decode(path, max_duration_s=600).samples
        # Trim espeak's leading/trailing silence so the reference is exact.
        voiced = np.flatnonzero(np.abs(samples) > 0.01)
        samples = samples[voiced[0] : voiced[-1] + 1]
        reference.append((speaker, round(t, 3), round(t + len(samples) / SAMPLE_RATE, 3)))
        pieces += [samples, np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)]
        t += len(samples) / SAMPLE_RATE + GAP_S
    return Audio(np.concatenate(pieces)), reference
