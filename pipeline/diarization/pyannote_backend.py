"""The ``pyannote`` diarization backend: a pyannote.audio pipeline behind Hark's ``Diarizer``.

For users who have pyannote pipelines: a local directory holding a ``config.yaml`` (what
``Pipeline.from_pretrained`` reads; its checkpoints may be local paths), or a hub id with a token
(internet needed). pyannote.audio 4 needs torchaudio, which imports only beside torch 2.9.1, so
this backend runs in its own environment (``scripts/pyannote-env.sh`` builds the one the tests
use); Hark's default backend needs none of it.

pyannote 4's speaker-diarization pipelines return an exclusive diarization beside the
overlapping one, and that is used when present; otherwise overlaps are resolved here (the later
turn wins the overlap) so that turns stay exclusive, ready for the word merge.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from pipeline.diarization.clustering import FRAME_S, ClusteringConfig, turns_from_frames
from pipeline.core.types import Diarization
from pipeline.diarization.base import DiarizationOptions
from pipeline.core.types import SAMPLE_RATE, Audio


class PyannoteDiarizer:
    def __init__(self, pipeline: Any, config: ClusteringConfig | None = None) -> None:
        self._pipeline = pipeline
        self._config = config or ClusteringConfig(merge_gap_s=0.0, min_turn_s=0.0)
        parameters = inspect.signature(pipeline.apply).parameters
        self._takes_counts = "num_speakers" in parameters

    @classmethod
    def load(cls, source: str, token: str | None = None, device: str = "cpu") -> "PyannoteDiarizer":
        """``source``: a local pipeline directory (with ``config.yaml``) or a hub id."""
        import torch
        from pyannote.audio import Pipeline

        try:
            pipeline = Pipeline.from_pretrained(source, token=token)
        except TypeError:  # pyannote.audio 3.x names the token differently
            pipeline = Pipeline.from_pretrained(source, use_auth_token=token)
        if pipeline is None:
            raise RuntimeError(f"pyannote could not load the pipeline {source!r} (gated? token?)")
        pipeline.to(torch.device(device))
        return cls(pipeline)

    def diarize(self, audio: Audio, options: DiarizationOptions) -> Diarization:
        import torch

        kwargs: dict[str, int] = {}
        if self._takes_counts:
            if options.num_speakers is not None:
                kwargs["num_speakers"] = options.num_speakers
            else:
                kwargs["min_speakers"], kwargs["max_speakers"] = options.min_speakers, options.max_speakers
        waveform = torch.from_numpy(np.ascontiguousarray(audio.span(), dtype=np.float32))[None]
        output = self._pipeline({"waveform": waveform, "sample_rate": SAMPLE_RATE}, **kwargs)
        annotation = getattr(output, "exclusive_speaker_diarization", None)
        if annotation is None:
            annotation = getattr(output, "speaker_diarization", output)
        return Diarization(exclusive_turns(annotation, audio.duration_s, self._config))


def exclusive_turns(annotation: Any, duration_s: float, config: ClusteringConfig):
    """pyannote ``Annotation`` → exclusive turns on a 10 ms grid, labelled SPEAKER_00… in order of
    first appearance. Where turns overlap, the one that started later holds the frames."""
    n_frames = int(np.ceil(duration_s / FRAME_S)) + 1
    frame_labels = np.full(n_frames, -1, dtype=int)
    ids: dict[str, int] = {}
    tracks = sorted(annotation.itertracks(yield_label=True), key=lambda t: (t[0].start, t[0].end))
    for segment, _, label in tracks:
        a = max(0, int(round(segment.start / FRAME_S)))
        b = min(n_frames, int(round(segment.end / FRAME_S)))
        frame_labels[a:b] = ids.setdefault(str(label), len(ids))
    return turns_from_frames(frame_labels, config)
