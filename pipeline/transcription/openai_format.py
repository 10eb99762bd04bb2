"""OpenAI's audio API in Hark's terms: the form of ``/v1/audio/transcriptions`` and
``/v1/audio/translations``, their response bodies and stream events, and errors in OpenAI's shape.

Framework-free, like the rest of ``pipeline``: ``deployments.openai_api`` adapts it to HTTP and
runs the same ``TranscriptionFlow`` as ``/v1/listen``. Shapes follow OpenAI's API reference and
the ``openai`` SDK's types (``Transcription``, ``TranscriptionVerbose``, ``TranscriptionDiarized``,
``TranscriptionTextDeltaEvent``/``DoneEvent``/``SegmentEvent``, ``Translation``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.core.errors import HarkError, InvalidParameter, NotFound
from pipeline.core.languages import normalize_language
from pipeline.core.types import AsrOptions, Segment, Transcript
from pipeline.transcription.merge import group_turns
from pipeline.transcription.render import _split_marks
from pipeline.transcription.schemas import ListenParams
from pipeline.transcription.subtitles import render_transcript

Task = Literal["transcribe", "translate"]
# The names OpenAI's own clients send; each means the one model this server runs.
MODEL_ALIASES: tuple[str, ...] = ("whisper-1",)
MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "verbose_json": "application/json",
    "diarized_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}

# Whisper's own language names (openai-whisper's tokenizer.LANGUAGES): verbose_json reports
# "english", not "en", as OpenAI does.
LANGUAGE_NAMES: dict[str, str] = dict(pair.split(":") for pair in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
    "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi "
    "fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish "
    "hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin "
    "mi:maori ml:malayalam cy:welsh sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian "
    "az:azerbaijani sl:slovenian kn:kannada et:estonian mk:macedonian br:breton eu:basque is:icelandic "
    "hy:armenian ne:nepali mn:mongolian bs:bosnian kk:kazakh sq:albanian sw:swahili gl:galician "
    "mr:marathi pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan "
    "ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek "
    "fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese sa:sanskrit lb:luxembourgish "
    "my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian ln:lingala ha:hausa "
    "ba:bashkir jw:javanese su:sundanese yue:cantonese"
).split())


class OpenAIParams(BaseModel):
    """The form fields of both routes (translations take no ``language`` or granularities)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"] = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    timestamp_granularities: tuple[Literal["word", "segment"], ...] = ("segment",)
    stream: bool = False

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, value: Any) -> Any:
        return normalize_language(value) if value is None or isinstance(value, str) else value

    @classmethod
    def parse(cls, fields: Mapping[str, Any], lists: Mapping[str, Sequence[str]], task: Task) -> "OpenAIParams":
        """From the form: ``INVALID_PARAMETER`` naming the first bad field, and OpenAI's own rules
        (word times only in verbose_json; no diarization or language on translations)."""
        values = {k: v for k, v in fields.items() if v != ""}
        granularities = lists.get("timestamp_granularities[]") or (
            [fields["timestamp_granularities"]] if fields.get("timestamp_granularities") else None)
        if granularities:
            values["timestamp_granularities"] = tuple(granularities)
        if "model" not in values:
            raise InvalidParameter("Missing required parameter: 'model'", param="model")
        try:
            params = cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else "body"
            raise InvalidParameter(f"Invalid value for {param!r}: {first['msg']}", param=param) from None
        if granularities and params.response_format != "verbose_json":
            raise InvalidParameter("timestamp_granularities needs response_format 'verbose_json'",
                                   param="timestamp_granularities")
        if task == "translate":
            if params.response_format == "diarized_json":
                raise InvalidParameter("Translations have no diarized_json format", param="response_format")
            # Whisper translates from the detected language; a language given is its source.
        return params

    def listen_params(self, word_times: bool) -> ListenParams:
        """The flow's options; ``word_times``: whether the engine can time words at all."""
        wants_words = "word" in self.timestamp_granularities or self.response_format in ("srt", "vtt")
        return ListenParams(
            language=self.language,
            diarize=self.response_format == "diarized_json",
            timestamps=wants_words and word_times,
        )

    def asr_options(self, params: ListenParams, task: Task) -> AsrOptions:
        return replace(params.asr_options(), prompt=self.prompt or None, temperature=self.temperature, task=task)


def check_model(model: str, served: str) -> None:
    """OpenAI's 404 for a model this server does not run (the served name or an alias)."""
    if model != served and model not in MODEL_ALIASES:
        raise NotFound(f"The model '{model}' does not exist: this server runs "
                       f"'{served}' (also called {', '.join(repr(a) for a in MODEL_ALIASES)})", param="model")


def models_list(served: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the served model and its aliases (the SDK's ``Model`` objects)."""
    return {"object": "list", "data": [model_object(m, created) for m in (served, *MODEL_ALIASES)]}


def model_object(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "hark"}


# ---- responses -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendered:
    """A response body: JSON (``body``) or a file (``text``), with its media type."""

    media_type: str
    body: dict[str, Any] | None = None
    text: str | None = None


def _usage(transcript: Transcript) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(transcript.duration_s)}


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def _segment(i: int, seg: Segment, temperature: float) -> dict[str, Any]:
    return {
        "id": i,
        "seek": int(round(seg.start * 100)),  # Whisper's unit: 10 ms mel frames
        "start": round(seg.start, 3),
        "end": round(seg.end, 3),
        "text": seg.text,
        "tokens": [],  # token ids are not kept past the engine
        "temperature": temperature,
        "avg_logprob": round(seg.avg_logprob, 4),
        "compression_ratio": _compression_ratio(seg.text),
        "no_speech_prob": 0.0,  # silence is cut by VAD before decoding
    }


def _words(transcript: Transcript) -> list[dict[str, Any]]:
    """Words as OpenAI gives them: no punctuation marks, no leading space."""
    out = []
    for w in transcript.words:
        core = _split_marks(w.text).core
        if core:
            out.append({"word": core, "start": round(w.start, 3), "end": round(w.end, 3)})
    return out


def speaker_letter(label: str, order: dict[str, str]) -> str:
    """``SPEAKER_00`` → ``A``, ... in order of first appearance (OpenAI's diarized labels)."""
    if label not in order:
        n, letters = len(order), ""
        while True:
            n, r = divmod(n, 26)
            letters = chr(ord("A") + r) + letters
            if n == 0:
                break
            n -= 1
        order[label] = letters
    return order[label]


def diarized_segments(transcript: Transcript, word_speakers: Sequence[str]) -> list[dict[str, Any]]:
    order: dict[str, str] = {}
    return [
        {"type": "transcript.text.segment", "id": f"seg_{i}", "start": round(start, 3), "end": round(end, 3),
         "text": said, "speaker": speaker_letter(who, order)}
        for i, (who, said, start, end) in enumerate(group_turns(transcript.words, word_speakers))
    ]


def render(transcript: Transcript, params: OpenAIParams, task: Task,
           word_speakers: Sequence[str] | None = None) -> Rendered:
    """The response to a finished transcription, in ``params.response_format``."""
    fmt = params.response_format
    text = transcript.text
    if fmt == "json":
        return Rendered(MEDIA_TYPES[fmt], body={"text": text, "usage": _usage(transcript)}
                        if task == "transcribe" else {"text": text})
    if fmt == "text":
        return Rendered(MEDIA_TYPES[fmt], text=text + "\n")
    if fmt in ("srt", "vtt"):
        return Rendered(MEDIA_TYPES[fmt], text=render_transcript(transcript, fmt))
    if fmt == "diarized_json":
        return Rendered(MEDIA_TYPES[fmt], body={
            "task": "transcribe", "duration": round(transcript.duration_s, 3), "text": text,
            "segments": diarized_segments(transcript, word_speakers or ()), "usage": _usage(transcript),
        })
    body: dict[str, Any] = {
        "task": task,
        # A translation's language is its output's: always English.
        "language": "english" if task == "translate" else LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": round(transcript.duration_s, 3),
        "text": text,
    }
    if "segment" in params.timestamp_granularities:
        body["segments"] = [_segment(i, s, params.temperature) for i, s in enumerate(transcript.segments)]
    if "word" in params.timestamp_granularities:
        body["words"] = _words(transcript)
    if task == "transcribe":
        body["usage"] = _usage(transcript)
    return Rendered(MEDIA_TYPES[fmt], body=body)


def stream_events(transcript: Transcript, params: OpenAIParams,
                  word_speakers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The Server-Sent Events of ``stream=true``: a ``transcript.text.delta`` per segment (per
    speaker turn, each followed by its ``transcript.text.segment``, for diarized_json), then
    ``transcript.text.done`` with the whole text."""
    events: list[dict[str, Any]] = []
    if params.response_format == "diarized_json" and word_speakers is not None:
        for seg in diarized_segments(transcript, word_speakers):
            events.append({"type": "transcript.text.delta", "delta": seg["text"], "segment_id": seg["id"]})
            events.append(seg)
    else:
        first = True
        for seg in transcript.segments:
            delta = seg.text.lstrip() if first else seg.text
            if delta:
                events.append({"type": "transcript.text.delta", "delta": delta})
                first = False
    events.append({"type": "transcript.text.done", "text": transcript.text})
    return events


# ---- errors ----------------------------------------------------------------------------------

def error_body(err: HarkError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` with OpenAI's types and, where OpenAI
    has one, its code (else Hark's, lower-cased); the HTTP status stays Hark's."""
    param = err.extra.get("param")
    if err.status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif err.status == 404 and param == "model":
        kind, code = "invalid_request_error", "model_not_found"
    elif err.status == 429:
        kind, code = "rate_limit_exceeded", "rate_limit_exceeded"
    elif err.status >= 500:
        kind, code = "server_error", err.code.lower()
    else:
        kind, code = "invalid_request_error", err.code.lower()
    return {"error": {"message": err.message, "type": kind, "param": param, "code": code}}
