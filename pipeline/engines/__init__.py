"""The ASR engine seam: one small Protocol, one adapter per inference library."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

from pipeline.settings import AsrSettings
from pipeline.types import AsrOptions, Audio, Transcript


@runtime_checkable
class AsrEngine(Protocol):
    """Speech to text for a batch of decoded audio.

    Capability flags say what an engine can honour; the service refuses requests for the rest
    instead of silently dropping an option.
    """

    supports_word_timestamps: ClassVar[bool]
    supports_language_detection: ClassVar[bool]

    @property
    def languages(self) -> frozenset[str]:
        """ISO 639-1 codes the loaded model can transcribe."""
        ...

    def check(self, options: AsrOptions) -> None:
        """Raise ``InvalidParameter`` for options this engine and model cannot honour."""
        ...

    def transcribe(self, batch: Sequence[Audio], options: Sequence[AsrOptions]) -> list[Transcript]:
        """One transcript per audio, ``options[i]`` applying to ``batch[i]``."""
        ...


def build_engine(settings: AsrSettings) -> AsrEngine:
    """The engine the settings name, with its model loaded."""
    if settings.engine == "ctranslate2":
        from pipeline.engines.ctranslate2 import CTranslate2Engine

        return CTranslate2Engine.from_settings(settings)
    raise ValueError(f"Unknown ASR engine: {settings.engine!r}")
