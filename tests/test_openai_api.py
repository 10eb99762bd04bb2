"""OpenAI's audio API, driven by the real ``openai`` SDK (its own types must parse every answer),
and subtitles on ``/v1/listen`` and ``GET /v1/jobs/{id}`` through the shared Serve app.

Every request is made once, in module-scoped fixtures, and the tests assert on the answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import srt
import webvtt
from openai.types.audio import (
    Transcription,
    TranscriptionDiarized,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    TranslationVerbose,
)

import assets
import conversation
from conftest import API_KEYS, wait_until
from media import encode
from pipeline.audio.decode import decode
from pipeline.transcription.render import strip_punctuation as normalize
from textnorm import wer

pytestmark = pytest.mark.serve

SERVED = "whisper-base"
# The openai npm package's last line that runs on Node 20 (7.x needs Node 22); installed once
# into the test-asset cache and reused by every later run.
NPM_OPENAI = "6.30.1"
NODE_SCRIPT = Path(__file__).parent / "node" / "transcribe.mjs"  # the bundled model the shared app runs (HARK_ASR__MODEL's default)


def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _check_cues(spans, duration):
    assert spans, "no cues"
    previous = 0.0
    for start, end in spans:
        assert previous - 1e-9 <= start < end <= duration + 1e-9, (start, end, duration)
        previous = end


def parse_srt(text: str, duration: float) -> list[srt.Subtitle]:
    subs = list(srt.parse(text))
    _check_cues([(s.start.total_seconds(), s.end.total_seconds()) for s in subs], duration)
    return subs


def parse_vtt(text: str, duration: float) -> list:
    captions = list(webvtt.WebVTT.from_string(text, strict=True))
    _check_cues([(_seconds(c.start), _seconds(c.end)) for c in captions], duration)
    return captions


@pytest.fixture(scope="module")
def client(serve_app):
    with openai.OpenAI(base_url=f"{serve_app}/v1", api_key=API_KEYS[0], max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory) -> tuple[bytes, float]:
    """Two voices, one line each (~8 s), as a WAV file."""
    assets.prepare()
    audio, reference = conversation.build()
    samples = audio.samples[: int((reference[1][2] + 0.2) * 16000)]
    return encode(samples, "wav"), len(samples) / 16000


@pytest.fixture(scope="module")
def answers(client, clips, dialogue):
    """Every OpenAI answer the tests look at, each asked once: Beckett's six sentences (10 s) for
    subtitles, the fox's one (3 s) for the rest."""
    beckett = ("beckett.wav", clips["beckett"].path.read_bytes(), "audio/wav")
    fox = ("fox.wav", clips["fox"].path.read_bytes(), "audio/wav")
    out = {"duration": decode(clips["beckett"].path, max_duration_s=600).duration_s,
           "fox_duration": decode(clips["fox"].path, max_duration_s=600).duration_s}
    t = client.audio.transcriptions
    out["json"] = t.with_raw_response.create(file=fox, model="whisper-1")
    out["text"] = t.with_raw_response.create(file=fox, model="whisper-1", response_format="text")
    out["srt"] = t.with_raw_response.create(file=beckett, model=SERVED, response_format="srt")
    out["vtt"] = t.with_raw_response.create(file=beckett, model="whisper-1", response_format="vtt")
    out["verbose"] = t.create(file=fox, model="whisper-1", response_format="verbose_json",
                              timestamp_granularities=["word", "segment"], language="en")
    out["stream"] = list(t.create(file=fox, model="whisper-1", stream=True))
    out["diarized"] = t.create(file=("two.wav", dialogue[0], "audio/wav"), model="whisper-1", response_format="diarized_json")
    spanish = ("es.wav", clips["spanish"].path.read_bytes(), "audio/wav")
    out["translation"] = client.audio.translations.create(file=spanish, model="whisper-1", response_format="verbose_json")
    return out


def test_json_and_text_parse_as_the_sdk_types(answers, clips):
    raw = answers["json"]
    assert raw.headers["content-type"].startswith("application/json")
    result = raw.parse()
    assert isinstance(result, Transcription)
    assert wer(clips["fox"].text, result.text) <= 0.2, result.text
    assert result.usage.type == "duration" and result.usage.seconds == int(np.ceil(answers["fox_duration"]))
    assert set(raw.http_response.json()) == {"text", "usage"}
    text = answers["text"]
    assert text.headers["content-type"].startswith("text/plain")
    assert text.parse() == result.text + "\n"
    # Limits headers, as on /v1/listen.
    assert "x-ratelimit-limit" in raw.headers


def test_srt_and_vtt_are_subtitles_real_parsers_read(answers):
    duration = answers["duration"]
    raw = answers["srt"]
    assert raw.headers["content-type"].startswith("application/x-subrip")
    subs = parse_srt(raw.parse(), duration)
    assert wer(assets.BECKETT_TEXT, " ".join(s.content for s in subs)) <= 0.2
    assert len(subs) >= 3
    assert all(len(line) <= 42 for s in subs for line in s.content.split("\n"))
    assert all(s.end - s.start <= timedelta(seconds=7) for s in subs)
    raw = answers["vtt"]
    assert raw.headers["content-type"].startswith("text/vtt")
    captions = parse_vtt(raw.parse(), duration)
    assert [c.text for c in captions] == [s.content for s in subs]


def test_verbose_json_words_and_segments(answers):
    verbose = answers["verbose"]
    assert isinstance(verbose, TranscriptionVerbose)
    assert verbose.language == "english" and verbose.duration == pytest.approx(answers["fox_duration"], abs=0.01)
    assert verbose.text == answers["json"].parse().text
    assert [w.word for w in verbose.words][:3] == ["The", "quick", "brown"]  # no marks, no spaces
    assert verbose.words[-1].word == "dog"
    for a, b in zip(verbose.words, verbose.words[1:]):
        assert a.start <= a.end <= b.start + 1e-6
    assert verbose.words[-1].end <= verbose.duration
    assert "".join(s.text for s in verbose.segments).strip() == verbose.text
    assert [s.id for s in verbose.segments] == list(range(len(verbose.segments)))
    assert all(s.avg_logprob <= 0 and s.compression_ratio > 0 for s in verbose.segments)
    assert verbose.usage.type == "duration"


def test_diarized_json_names_speakers_in_order(answers, dialogue):
    diarized = answers["diarized"]
    assert isinstance(diarized, TranscriptionDiarized) and diarized.task == "transcribe"
    assert [s.speaker for s in diarized.segments] == ["A", "B"]
    assert wer(conversation.LINES[0][1], diarized.segments[0].text) <= 0.3, diarized.segments[0].text
    assert diarized.segments[0].end <= diarized.segments[1].start <= diarized.duration
    assert diarized.duration == pytest.approx(dialogue[1], abs=0.01)


def test_stream_deltas_add_up_to_the_done_text(answers):
    events = answers["stream"]
    assert isinstance(events[-1], TranscriptionTextDoneEvent)
    deltas = [e for e in events[:-1] if isinstance(e, TranscriptionTextDeltaEvent)]
    assert len(deltas) == len(events) - 1 >= 1
    assert "".join(d.delta for d in deltas) == events[-1].text == answers["json"].parse().text


def test_translation_is_english(answers):
    translation = answers["translation"]
    assert isinstance(translation, TranslationVerbose) and translation.language == "english"
    # whisper-base renders espeak's robotic Spanish loosely (and, through the temperature
    # fallback, differently from run to run), but in English: none of the Spanish words is left.
    words = set(normalize(translation.text).split())
    # Less what an English rendering keeps or shares: names (Carlos, Madrid) and "me".
    spanish = set(normalize(assets.FOREIGN[0][3]).split()) - {"me", "carlos", "madrid"}
    assert words and not words & spanish, translation.text
    assert translation.segments and translation.duration > 0


def test_errors_in_openai_shape(client, serve_app, clips):
    wav = ("beckett.wav", clips["beckett"].path.read_bytes(), "audio/wav")
    with openai.OpenAI(base_url=f"{serve_app}/v1", api_key="not-a-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            bad.audio.transcriptions.create(file=wav, model="whisper-1")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert set(err.value.response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as err:
        client.audio.transcriptions.create(file=wav, model="whisper-9")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's own rule
        client.audio.transcriptions.create(file=wav, model="whisper-1", timestamp_granularities=["word"])
    assert err.value.param == "timestamp_granularities"
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(file=("x.wav", b"RIFF....WAVEjunk", "audio/wav"), model="whisper-1")
    assert err.value.code in ("invalid_audio", "unsupported_format") and err.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(file=wav, model="whisper-1", response_format="xml")
    assert err.value.param == "response_format"


def test_rate_limit_is_429_with_retry_after(serve_app, clips):
    wav = ("beckett.wav", clips["beckett"].path.read_bytes(), "audio/wav")
    with openai.OpenAI(base_url=f"{serve_app}/v1", api_key="openai-rpm-key", max_retries=0) as limited:
        with pytest.raises(openai.NotFoundError):  # admitted (and counted), then refused for its model
            limited.audio.transcriptions.create(file=wav, model="whisper-9")
        with pytest.raises(openai.RateLimitError) as err:
            limited.audio.transcriptions.create(file=wav, model="whisper-1")
    assert err.value.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [SERVED, "whisper-1"]
    assert client.models.retrieve("whisper-1").owned_by == "hark"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o-transcribe")


# ---- /v1/listen and GET /v1/jobs/{id} with format= --------------------------------------------

@pytest.fixture(scope="module")
def listen_files(serve_app, clips, receiver, answers):
    api = httpx.Client(base_url=serve_app, timeout=300, headers={"Authorization": f"Token {API_KEYS[0]}"})
    audio = clips["beckett"].path.read_bytes()
    out = {fmt: api.post("/v1/listen", params={"format": fmt}, files={"audio": audio}) for fmt in ("srt", "vtt")}
    out["text"] = api.post("/v1/listen", params={"format": "text"}, files={"audio": clips["fox"].path.read_bytes()})
    out["bad"] = api.post("/v1/listen", params={"format": "docx"}, files={"audio": audio})
    api.close()
    return out


@pytest.fixture(scope="module")
def job_files(serve_app, clips, receiver):
    api = httpx.Client(base_url=serve_app, timeout=300, headers={"Authorization": f"Token {API_KEYS[0]}"})
    audio = clips["beckett"].path.read_bytes()
    job = api.post("/v1/listen", params={"callback_url": receiver.url("/hook/subtitles"), "format": "srt"},
                   files={"audio": audio})
    assert job.status_code == 202, job.text  # the 202 stays JSON
    job_id = job.json()["job_id"]
    wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["status"] == "completed", 120, what="the job")
    out = {fmt: api.get(f"/v1/jobs/{job_id}", params={"format": fmt}) for fmt in ("json", "srt", "vtt", "text")}
    api.close()
    return out


def test_listen_answers_files_with_their_content_types(listen_files, answers):
    duration = answers["duration"]
    srt_answer, vtt_answer, text_answer = listen_files["srt"], listen_files["vtt"], listen_files["text"]
    assert srt_answer.status_code == 200 and srt_answer.headers["content-type"].startswith("application/x-subrip")
    assert "x-ratelimit-limit" in srt_answer.headers
    # The same flow and renderer as the OpenAI route: the same files.
    assert srt_answer.text == answers["srt"].parse()
    assert vtt_answer.headers["content-type"].startswith("text/vtt") and vtt_answer.text == answers["vtt"].parse()
    parse_vtt(vtt_answer.text, duration)
    assert text_answer.headers["content-type"].startswith("text/plain")
    assert text_answer.text == answers["json"].parse().text + "\n"
    bad = listen_files["bad"]
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_PARAMETER" and bad.json()["param"] == "format"


def test_finished_job_downloads_as_files(job_files, answers):
    job = job_files
    body = job["json"].json()
    assert body["status"] == "completed" and body["result"]["words"]  # format=srt asked word times
    subs = parse_srt(job["srt"].text, body["result"]["duration"])
    assert job["srt"].headers["content-type"].startswith("application/x-subrip")
    # Rebuilt from the stored words, the cues match those made from the transcript itself.
    assert [(s.start, s.end, s.content) for s in subs] == [
        (s.start, s.end, s.content) for s in srt.parse(answers["srt"].parse())]
    parse_vtt(job["vtt"].text, body["result"]["duration"])
    assert job["text"].text == body["result"]["text"] + "\n"


@pytest.fixture(scope="module")
def node_openai(tmp_path_factory) -> Path:
    """A folder with the openai npm package, installed once into the test-asset cache."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("Node 20 and npm are needed for the openai npm package test")
    cached = assets.CACHE / "npm" / f"openai-{NPM_OPENAI}"
    if not (cached / "node_modules" / "openai" / "package.json").exists():
        staging = Path(str(cached) + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        subprocess.run(["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--no-save",
                        f"openai@{NPM_OPENAI}"], check=True, capture_output=True, timeout=300)
        staging.rename(cached)
    # Node resolves "openai" from a node_modules beside or above the script: a copy of it there.
    work = tmp_path_factory.mktemp("node")
    (work / "node_modules").symlink_to(cached / "node_modules")
    shutil.copy(NODE_SCRIPT, work / NODE_SCRIPT.name)
    return work / NODE_SCRIPT.name


def test_openai_npm_package_under_node(node_openai, serve_app, clips, answers):
    run = subprocess.run(["node", str(node_openai), f"{serve_app}/v1", API_KEYS[0], str(clips["fox"].path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["text"] == answers["json"].parse().text  # what the Python SDK got
    assert out["usage"] == {"type": "duration", "seconds": int(np.ceil(answers["fox_duration"]))}
    events = out["events"]
    assert [e["type"] for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"] == out["text"]
    assert out["error"] == {"name": "NotFoundError", "status": 404, "code": "model_not_found", "param": "model"}
