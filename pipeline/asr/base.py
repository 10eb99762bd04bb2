"""The ASR engine seam: one small Protocol, one adapter per inference library."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from pipeline.core.errors import InvalidAudio, InvalidParameter
from pipeline.core.types import AsrOptions, Audio, Transcript

logger = logging.getLogger(__name__)


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
        self, *, language: str | None, timestamps: bool = False, diarize: bool = False, streaming: bool = False,
        task: str = "transcribe",
    ) -> None:
        """``INVALID_PARAMETER`` naming the first option this engine cannot honour."""
        if task == "translate" and self.languages == frozenset({"en"}):
            raise InvalidParameter("The loaded model is English-only: it cannot translate", param="task")
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


def check_audio(audio: Audio) -> None:
    """``INVALID_AUDIO`` for samples no engine can use: NaN or infinite values (a float WAV can
    hold them, and clipping keeps NaN). Whisper would decode them for minutes into nonsense."""
    # The float64 sum is NaN or infinite exactly when a sample is (float32 samples cannot
    # overflow it), and needs no (n_samples,) mask: 115 MB for two hours.
    with np.errstate(invalid="ignore"):  # inf + -inf: NaN, which is the answer wanted
        total = audio.samples.sum(dtype=np.float64)
    if not np.isfinite(total):
        raise InvalidAudio("The audio holds samples that are not finite numbers (NaN or infinity)")


def transcribe_each(
    engine: AsrEngine, batch: Sequence[Audio], options: Sequence[AsrOptions]
) -> list[Transcript | Exception]:
    """One outcome per audio: its transcript, or the error that it alone raised.

    A batch gathers unrelated requests, so one bad request must not fail the others. Audio and
    options the engine refuses are set aside first; the rest run as one engine call, and only
    if that call fails does each audio run again on its own, to find whose error it was (a
    model fault, or a batch too large for the device).
    """
    if len(batch) != len(options):
        raise ValueError(f"{len(batch)} audios but {len(options)} options")
    outcomes: list[Transcript | Exception | None] = [None] * len(batch)
    todo = []
    for i, (audio, opts) in enumerate(zip(batch, options)):
        try:
            check_audio(audio)
            engine.check(opts)
        except (InvalidAudio, InvalidParameter) as exc:
            outcomes[i] = exc
        else:
            todo.append(i)
    try:
        results = engine.transcribe([batch[i] for i in todo], [options[i] for i in todo]) if todo else []
    except Exception as exc:  # noqa: BLE001 - whose error it is, is found below
        if len(todo) == 1:
            outcomes[todo[0]] = exc
        else:
            logger.warning("A batch of %d failed (%r): transcribing each audio on its own", len(todo), exc)
            for i in todo:
                try:
                    [outcomes[i]] = engine.transcribe([batch[i]], [options[i]])
                except Exception as alone:  # noqa: BLE001 - this request's own error
                    outcomes[i] = alone
    else:
        for i, result in zip(todo, results, strict=True):
            outcomes[i] = result
    return outcomes  # type: ignore[return-value]  # every slot is filled
