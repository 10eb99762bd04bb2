"""The ASR engine seam: one small Protocol, one adapter per inference library."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from pipeline.core.errors import InvalidParameter
from pipeline.core.types import AsrOptions, Audio, Transcript


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


@dataclass(frozen=True)
class Capabilities:
    """What the loaded engine and model can honour: sent once to each ingress, which refuses
    requests for the rest before any audio is fetched."""

    engine: str
    word_timestamps: bool
    language_detection: bool
    languages: frozenset[str]

    @classmethod
    def of(cls, engine: AsrEngine, name: str) -> "Capabilities":
        return cls(
            engine=name,
            word_timestamps=engine.supports_word_timestamps,
            language_detection=engine.supports_language_detection,
            languages=engine.languages,
        )

    def refuse_unsupported(
        self, *, language: str | None, timestamps: bool = False, diarize: bool = False, streaming: bool = False
    ) -> None:
        """``INVALID_PARAMETER`` naming the first option this engine cannot honour."""
        if language is not None and language not in self.languages:
            only = " (it is English-only)" if self.languages == frozenset({"en"}) else ""
            raise InvalidParameter(f"The loaded model cannot transcribe language {language!r}{only}", param="language")
        if language is None and not self.language_detection:
            raise InvalidParameter(f"The {self.engine} engine cannot detect the language: give one", param="language")
        if not self.word_timestamps:
            for wanted, param, why in (
                (timestamps, "timestamps", "word timestamps"),
                (diarize, "diarize", "diarization (words get speakers by their times)"),
                (streaming, "encoding", "live streaming (words are committed by their times)"),
            ):
                if wanted:
                    raise InvalidParameter(
                        f"The {self.engine} engine cannot time words, which {why} needs; "
                        "use HARK_ASR__ENGINE=ctranslate2 or transformers",
                        param=param,
                    )
