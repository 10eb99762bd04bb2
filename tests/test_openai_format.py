"""OpenAI's form, bodies, stream events and errors, on synthetic transcripts; every body is read
back with the ``openai`` SDK's own types."""

from __future__ import annotations

import pydantic
import pytest
from openai.types.audio import (
    Transcription,
    TranscriptionDiarized,
    TranscriptionStreamEvent,
    TranscriptionVerbose,
    TranslationVerbose,
)

from pipeline.core.errors import InvalidParameter, NotFound, RateLimited, ServiceUnavailable, Unauthorized
from pipeline.core.types import Segment, Transcript, Word
from pipeline.transcription.openai_format import (
    OpenAIParams,
    check_model,
    error_body,
    render,
    speaker_letter,
    stream_events,
)

WORDS = (Word(" Hello,", 0.0, 0.4, 0.9), Word(" world.", 0.5, 0.9, 0.9), Word(" Bye!", 2.0, 2.3, 0.8))
TRANSCRIPT = Transcript(
    (Segment(" Hello, world.", 0.0, 0.9, -0.2, 5, WORDS[:2]), Segment(" Bye!", 2.0, 2.3, -0.4, 3, WORDS[2:])),
    "en", 0.99, 3.2,
)
SPEAKERS = ("SPEAKER_00", "SPEAKER_00", "SPEAKER_01")


def params(task="transcribe", lists=None, **fields) -> OpenAIParams:
    return OpenAIParams.parse({"model": "whisper-1", **fields}, lists or {}, task)


def test_form_fields_and_openais_rules():
    p = params(lists={"timestamp_granularities[]": ["word", "segment"]}, response_format="verbose_json",
               language="en-US", temperature="0.4", prompt="Names: Beckett.")
    assert p.timestamp_granularities == ("word", "segment") and p.language == "en" and p.temperature == 0.4
    options = p.asr_options(p.listen_params(word_times=True), "translate")
    assert (options.prompt, options.temperature, options.task, options.word_timestamps) == ("Names: Beckett.", 0.4, "translate", True)
    assert params().listen_params(word_times=True).timestamps is False  # plain json needs no word times
    assert params(response_format="srt").listen_params(word_times=True).timestamps is True
    assert params(response_format="diarized_json").listen_params(word_times=True).diarize is True
    for bad, param in [
        ({"lists": {"timestamp_granularities[]": ["word"]}}, "timestamp_granularities"),  # needs verbose_json
        ({"response_format": "xml"}, "response_format"),
        ({"temperature": "1.5"}, "temperature"),
        ({"language": "xx"}, "language"),
        ({"task": "translate", "response_format": "diarized_json"}, "response_format"),
    ]:
        with pytest.raises(InvalidParameter) as err:
            params(**bad)
        assert err.value.extra["param"] == param
    with pytest.raises(InvalidParameter) as err:
        OpenAIParams.parse({}, {}, "transcribe")
    assert err.value.extra["param"] == "model"


def test_models_by_name_or_alias():
    check_model("whisper-1", "whisper-base")
    check_model("whisper-base", "whisper-base")
    with pytest.raises(NotFound) as err:
        check_model("gpt-4o-transcribe", "whisper-base")
    assert error_body(err.value)["error"]["code"] == "model_not_found"


def test_bodies_parse_as_the_sdk_types():
    json_body = render(TRANSCRIPT, params(), "transcribe").body
    assert Transcription.model_validate(json_body).text == "Hello, world. Bye!" and json_body["usage"]["seconds"] == 4
    verbose = TranscriptionVerbose.model_validate(render(TRANSCRIPT, params(response_format="verbose_json"), "transcribe").body)
    assert verbose.words is None and [s.text for s in verbose.segments] == [" Hello, world.", " Bye!"]
    words_only = render(TRANSCRIPT, params(response_format="verbose_json", lists={"timestamp_granularities[]": ["word"]}), "transcribe").body
    assert "segments" not in words_only
    assert [w.word for w in TranscriptionVerbose.model_validate(words_only).words] == ["Hello", "world", "Bye"]
    translated = TranslationVerbose.model_validate(render(TRANSCRIPT, params(response_format="verbose_json"), "translate").body)
    assert translated.language == "english"
    diarized = TranscriptionDiarized.model_validate(
        render(TRANSCRIPT, params(response_format="diarized_json"), "transcribe", SPEAKERS).body)
    assert [(s.speaker, s.text, s.start, s.end) for s in diarized.segments] == [("A", "Hello, world.", 0.0, 0.9), ("B", "Bye!", 2.0, 2.3)]
    srt_file = render(TRANSCRIPT, params(response_format="srt"), "transcribe")
    assert srt_file.media_type.startswith("application/x-subrip") and srt_file.text.startswith("1\n00:00:00,000 --> ")
    assert render(TRANSCRIPT, params(response_format="text"), "transcribe").text == "Hello, world. Bye!\n"


def test_stream_events_parse_and_add_up():
    adapter = pydantic.TypeAdapter(TranscriptionStreamEvent)
    plain = [adapter.validate_python(e) for e in stream_events(TRANSCRIPT, params())]
    assert [e.type for e in plain] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
    assert "".join(e.delta for e in plain[:-1]) == plain[-1].text == TRANSCRIPT.text
    diarized = [adapter.validate_python(e) for e in stream_events(TRANSCRIPT, params(response_format="diarized_json"), SPEAKERS)]
    assert [e.type for e in diarized] == ["transcript.text.delta", "transcript.text.segment"] * 2 + ["transcript.text.done"]
    assert [e.segment_id for e in diarized if e.type == "transcript.text.delta"] == ["seg_0", "seg_1"]
    assert [e.speaker for e in diarized if e.type == "transcript.text.segment"] == ["A", "B"]


def test_speaker_letters_go_on_past_z():
    order: dict[str, str] = {}
    letters = [speaker_letter(f"SPEAKER_{i:02d}", order) for i in range(28)]
    assert letters[:2] == ["A", "B"] and letters[25:] == ["Z", "AA", "AB"]


def test_errors_in_openais_shape_keep_hark_statuses():
    for err, kind, code in [
        (Unauthorized(), "invalid_request_error", "invalid_api_key"),
        (InvalidParameter("bad", param="language"), "invalid_request_error", "invalid_parameter"),
        (RateLimited("slow down", retry_after=7), "rate_limit_exceeded", "rate_limit_exceeded"),
        (ServiceUnavailable(retry_after=30), "server_error", "service_unavailable"),
    ]:
        body = error_body(err)["error"]
        assert (body["type"], body["code"]) == (kind, code) and set(body) == {"message", "type", "param", "code"}
    assert error_body(InvalidParameter("bad", param="language"))["error"]["param"] == "language"
    assert RateLimited("slow down", retry_after=7).headers()["Retry-After"] == "7"
