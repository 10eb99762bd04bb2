"""The diarizer the settings name (``HARK_DIARIZATION__BACKEND``)."""

from __future__ import annotations

from pipeline.core.settings import DiarizationSettings
from pipeline.diarization.base import Diarizer


def build_diarizer(settings: DiarizationSettings | None = None) -> Diarizer:
    """The backend the settings name, with its models loaded."""
    settings = settings or DiarizationSettings()
    if settings.backend == "pyannote":
        from pipeline.diarization.pyannote_backend import PyannoteDiarizer

        token = settings.pyannote_token.get_secret_value() if settings.pyannote_token else None
        return PyannoteDiarizer.load(settings.pyannote_pipeline, token=token, device=settings.device)
    from pipeline.diarization.clustering import EmbeddingClusteringDiarizer, SegmentationDiarizer, SpeakerEncoder

    encoder = SpeakerEncoder(device=settings.device, threads=settings.threads)
    if settings.backend == "embedding":
        return EmbeddingClusteringDiarizer(encoder)
    if settings.backend == "default":
        return SegmentationDiarizer(encoder)
    raise ValueError(f"Unknown diarization backend: {settings.backend!r}")
