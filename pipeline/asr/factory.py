"""The engine the settings name (``HARK_ASR__ENGINE``), with its model loaded."""

from __future__ import annotations

from pipeline.asr.base import AsrEngine
from pipeline.core.settings import AsrSettings


def build_engine(settings: AsrSettings) -> AsrEngine:
    """The engine the settings name, with its model loaded."""
    if settings.engine == "ctranslate2":
        from pipeline.asr.ctranslate2 import CTranslate2Engine

        return CTranslate2Engine.from_settings(settings)
    if settings.engine == "transformers":
        from pipeline.asr.transformers import TransformersEngine

        return TransformersEngine.from_settings(settings)
    if settings.engine == "vllm":
        from pipeline.asr.vllm import VllmEngine

        return VllmEngine.from_settings(settings)
    raise ValueError(f"Unknown ASR engine: {settings.engine!r}")
