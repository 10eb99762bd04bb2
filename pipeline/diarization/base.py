"""The diarization seam: options and the ``Diarizer`` Protocol every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pipeline.core.types import Audio, Diarization


@dataclass(frozen=True)
class DiarizationOptions:
    num_speakers: int | None = None  # exact count when given
    min_speakers: int = 1
    max_speakers: int = 8


class Diarizer(Protocol):
    def diarize(self, audio: Audio, options: DiarizationOptions) -> Diarization: ...
