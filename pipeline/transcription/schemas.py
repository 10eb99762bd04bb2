"""HTTP-edge models: request options as ``API.md`` names them, and the response body."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import InvalidParameter
from pipeline.core.languages import normalize_language
from pipeline.core.types import AsrOptions

MAX_SPEAKERS = 32


class ListenParams(BaseModel):
    """Options of ``POST /v1/listen``, from JSON fields, form fields or query parameters.

    Unknown names are ignored, as Deepgram does, so Deepgram clients that send more work.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    language: str | None = None
    punctuate: bool = True
    diarize: bool = False
    num_speakers: int | None = None
    timestamps: bool = False
    callback_url: str | None = None
    # Deepgram's groupings (API.md is silent on them): utterances split on pauses of utt_split s.
    utterances: bool = False
    utt_split: float = Field(0.8, gt=0, le=60)
    paragraphs: bool = False

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return normalize_language(value)
        return value

    @model_validator(mode="after")
    def _speakers_only_with_diarize(self) -> "ListenParams":
        if not self.diarize:
            # Meaningless without diarization: ignored, as API.md says, whatever its value.
            object.__setattr__(self, "num_speakers", None)
        elif self.num_speakers is not None and not 1 <= self.num_speakers <= MAX_SPEAKERS:
            raise InvalidParameter(
                f"num_speakers must be between 1 and {MAX_SPEAKERS}", param="num_speakers"
            )
        return self

    @classmethod
    def parse(cls, fields: dict[str, Any]) -> "ListenParams":
        """Validate, turning the first problem into ``INVALID_PARAMETER`` naming the field."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else "body"
            raise InvalidParameter(f"Invalid value for {param!r}: {first['msg']}", param=param) from None

    def asr_options(self) -> AsrOptions:
        # Diarization needs word times to give each word its speaker, utterances and paragraphs
        # to place their bounds.
        return AsrOptions(language=self.language, word_timestamps=self.word_times)

    @property
    def word_times(self) -> bool:
        """Whether the answer needs the engine to time words."""
        return self.timestamps or self.diarize or self.utterances or self.paragraphs


class WordOut(BaseModel):
    word: str
    start: float
    end: float
    confidence: float
    speaker: str | None = None


class SpeakerTurnOut(BaseModel):
    speaker: str
    text: str
    start: float
    end: float


class ListenResponse(BaseModel):
    request_id: str
    text: str
    confidence: float
    duration: float
    language: str
    words: list[WordOut] | None = None
    speakers: list[SpeakerTurnOut] | None = None
    utterances: list[dict[str, Any]] | None = None  # pipeline.transcription.grouping
    paragraphs: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        # `words` and `speakers` appear only when asked for; a word's `speaker` only with diarize.
        body = self.model_dump(exclude_none=True)
        return body
