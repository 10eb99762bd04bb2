"""Live streaming over a real WebSocket, through the real app and the real model."""

import asyncio
import io
import json
import time

import numpy as np
import pytest
import websockets

import assets
from conftest import API_KEYS
from pipeline.audio.decode import decode
from pipeline.core.types import AsrOptions
from pipeline.tools.stream_client import linear16, send_pcm
from textnorm import wer

pytestmark = pytest.mark.serve


def ws_url(serve_app, query=""):
    return serve_app.replace("http://", "ws://") + "/v1/listen/stream" + (f"?{query}" if query else "")


def pcm_of(clip, rate=16000):
    return linear16(decode(clip.path, max_duration_s=600).samples)


async def stream(url, pcm, *, speed=1.0, headers=None, subprotocols=None, chunk_s=0.1, extra=()):
    """Send PCM at ``speed`` x real time; return every message and the close code."""
    kwargs = {"additional_headers": headers or {"Authorization": f"Token {API_KEYS[0]}"}}
    if subprotocols:
        kwargs = {"subprotocols": subprotocols}
    async with websockets.connect(url, **kwargs) as ws:
        sender = asyncio.create_task(send_pcm(ws, pcm, speed=speed, chunk_s=chunk_s, before=extra))
        messages = await drain(ws)
        await sender
        return messages, ws.close_code


async def drain(ws):
    """Every message until the close, whatever its code."""
    out = []
    try:
        async for raw in ws:
            out.append(json.loads(raw))
    except websockets.ConnectionClosed:
        pass
    return out


def finals_text(messages):
    return " ".join(m["text"] for m in messages if m["type"] == "Results" and m["is_final"] and m["text"])


def test_stream_matches_batch_and_finals_are_stable(serve_app, api, clips):
    messages, code = asyncio.run(stream(ws_url(serve_app), pcm_of(clips["sample"]), speed=2.0))
    assert code == 1000
    assert messages[-1]["type"] == "Metadata" and messages[-1]["duration"] == pytest.approx(30.0, abs=0.01)
    assert messages[-1]["request_id"].startswith("req_") and messages[-1]["language"] == "en"
    results = [m for m in messages if m["type"] == "Results"]
    assert any(not m["is_final"] for m in results) and any(m["speech_final"] for m in results)
    finals = [m for m in results if m["is_final"]]
    # Finals follow each other in time and never overlap: once final, a stretch is never redone.
    for a, b in zip(finals, finals[1:]):
        assert a["start"] + a["duration"] <= b["start"] + 0.05
    batch = api.post("/v1/listen", files={"audio": clips["sample"].path.read_bytes()}).json()["text"]
    reference = clips["sample"].text
    assert wer(reference, finals_text(messages)) <= wer(reference, batch) + 0.15


def test_real_time_pace_and_browser_subprotocol_auth(serve_app, clips):
    messages, code = asyncio.run(
        stream(ws_url(serve_app, "interim_results=false&punctuate=false"), pcm_of(clips["beckett"]),
               subprotocols=["token", API_KEYS[1]])
    )
    assert code == 1000
    assert all(m["is_final"] for m in messages if m["type"] == "Results")
    text = finals_text(messages)
    assert wer(clips["beckett"].text, text) <= 0.2 and text == text.lower()


def test_a_stream_s_language_is_detected_from_its_finals(serve_app, clips):
    """No language given: the stream takes it from a final decode sure of it, not from its first
    interim (half a second of speech): espeak-ng's French sentence came out in Japanese to the end
    when its first interim's guess held for the whole stream."""

    languages = {name: language for name, _voice, language, _text in assets.FOREIGN}

    async def all_at_once():
        return await asyncio.gather(*(stream(ws_url(serve_app), pcm_of(clips[name]), speed=2.0) for name in languages))

    answers = dict(zip(languages, asyncio.run(all_at_once())))
    for name, (messages, code) in answers.items():
        assert code == 1000 and messages[-1]["type"] == "Metadata"
        assert messages[-1]["language"] == languages[name], (name, messages)
        finals = [m for m in messages if m["type"] == "Results" and m["is_final"] and m["words"]]
        assert finals and finals[-1]["language"] == languages[name], (name, finals)
    spanish = finals_text(answers["spanish"][0])
    assert wer(clips["spanish"].text, spanish) <= 0.35, spanish


def test_other_rates_and_channels(serve_app, clips):
    """8 kHz stereo PCM is read as such: the stream lasts as long as the clip, and its finals say what the
    model says of the same audio as a file, decoded greedily as a stream's finals are. At 8 kHz Whisper
    mishears the fox clip ("quick round fox jump over the lady dog"): the reference alone would test luck."""
    import av
    import scipy.io.wavfile
    from ray import serve

    samples = decode(clips["fox"].path, max_duration_s=60).samples
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=8000)
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = 16000
    pcm = b"".join(bytes(f.planes[0])[: f.samples * 4] for f in [*resampler.resample(frame), *resampler.resample(None)])
    messages, code = asyncio.run(stream(ws_url(serve_app, "sample_rate=8000&channels=2"), pcm, speed=4.0, chunk_s=0.05))
    assert code == 1000
    metadata = messages[-1]
    assert metadata["type"] == "Metadata" and metadata["channels"] == 2
    assert metadata["duration"] == pytest.approx(len(samples) / 16000, abs=0.01)
    wav = io.BytesIO()
    scipy.io.wavfile.write(wav, 8000, np.frombuffer(pcm, dtype="<i2").reshape(-1, 2))
    as_file = decode(wav.getvalue(), max_duration_s=60)
    handle = serve.get_deployment_handle("ASR", app_name="hark")
    greedy = handle.transcribe.remote(as_file, AsrOptions(language="en", beam_size=1)).result(timeout_s=120).text
    streamed = finals_text(messages)
    assert wer(greedy, streamed) <= 0.25 and wer(clips["fox"].text, greedy) <= 0.5, (streamed, greedy)


def test_keepalive_holds_a_silent_stream_and_silence_closes_it(serve_app):
    async def keepalive():
        async with websockets.connect(ws_url(serve_app), additional_headers={"Authorization": f"Token {API_KEYS[0]}"}) as ws:
            for _ in range(8):  # 4 s of KeepAlive, twice the app's 2 s idle timeout
                await ws.send(json.dumps({"type": "KeepAlive"}))
                await asyncio.sleep(0.5)
            await ws.send(json.dumps({"type": "CloseStream"}))
            return await drain(ws), ws.close_code

    messages, code = asyncio.run(keepalive())
    assert code == 1000 and messages[-1]["type"] == "Metadata" and messages[-1]["duration"] == 0

    async def silent():
        started = time.monotonic()
        async with websockets.connect(ws_url(serve_app), additional_headers={"Authorization": f"Token {API_KEYS[0]}"}) as ws:
            messages = await drain(ws)
            return messages, ws.close_code, time.monotonic() - started

    messages, code, waited = asyncio.run(silent())
    assert messages == [{"type": "Error", "code": "TIMEOUT", "error": messages[0]["error"]}]
    assert code == 1011 and 1.5 < waited < 10


@pytest.mark.parametrize("headers, subprotocols", [({}, None), ({"Authorization": "Token nope"}, None), (None, ["token", "nope"])])
def test_bad_auth_is_refused_before_the_handshake(serve_app, headers, subprotocols):
    """Review finding 8: the socket was accepted before the key was checked. Now the upgrade is
    refused with the API's 401, as Deepgram refuses it."""

    async def go():
        kwargs = {"subprotocols": subprotocols} if subprotocols else {"additional_headers": headers}
        async with websockets.connect(ws_url(serve_app), **kwargs):
            pass

    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(go())
    response = refused.value.response
    assert response.status_code == 401 and json.loads(response.body)["code"] == "UNAUTHORIZED"


def test_floods_and_huge_frames_are_refused(serve_app):
    """Review finding 8: frames up to 16 MiB were taken, at any pace, for any length."""

    async def send(frames, interval_s=0.0):
        async with websockets.connect(ws_url(serve_app), additional_headers={"Authorization": f"Token {API_KEYS[0]}"}) as ws:

            async def sender():
                try:
                    for frame in frames:
                        await ws.send(frame)
                        await asyncio.sleep(interval_s)
                    await ws.send(json.dumps({"type": "CloseStream"}))
                except websockets.ConnectionClosed:
                    pass  # the server ended the stream first

            sending = asyncio.create_task(sender())
            messages = await drain(ws)
            await sending
            return messages, ws.close_code

    # 60 s of audio as fast as it goes: far beyond 4x real time once the 10 s burst is spent.
    messages, code = asyncio.run(send([bytes(16000)] * 120))
    assert messages[-1]["code"] == "RATE_LIMITED" and messages[-1]["retry_after"] >= 1 and code == 1008
    # One frame of 2 MiB (65 s of audio).
    messages, code = asyncio.run(send([bytes(2 << 20)]))
    assert messages == [{"type": "Error", "code": "INVALID_PARAMETER", "param": "message", "error": messages[0]["error"]}]
    assert code == 1009


def test_malformed_frames_get_an_error_not_a_crash(serve_app, clips):
    messages, code = asyncio.run(
        stream(ws_url(serve_app), pcm_of(clips["fox"]), speed=4.0, extra=["not json", json.dumps({"type": "Dance"})])
    )
    errors = [m for m in messages if m["type"] == "Error"]
    assert len(errors) == 2 and all(e["code"] == "INVALID_PARAMETER" for e in errors)
    assert code == 1000 and "fox" in finals_text(messages).lower()


@pytest.mark.parametrize("query, param", [("sample_rate=abc", "sample_rate"), ("encoding=mulaw", "encoding"), ("interim_results=maybe", "interim_results"), ("language=xx", "language")])
def test_bad_parameters_are_refused_in_the_handshake(serve_app, query, param):
    """Like a bad key, a bad option is refused before the upgrade with the API's 400 and body, as
    Deepgram refuses it (it used to be accepted, then answered with an Error message and 1008)."""

    async def go():
        async with websockets.connect(ws_url(serve_app, query), additional_headers={"Authorization": f"Token {API_KEYS[0]}"}):
            pass

    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(go())
    response = refused.value.response
    body = json.loads(response.body)
    assert response.status_code == 400 and body["code"] == "INVALID_PARAMETER" and body["param"] == param, body


def test_concurrent_streams(serve_app, clips):
    pcms = [pcm_of(clips[name]) for name in ("fox", "weather", "report")]

    async def all_of_them():
        return await asyncio.gather(*(stream(ws_url(serve_app), pcm, speed=2.0) for pcm in pcms))

    outcomes = asyncio.run(all_of_them())
    for (messages, code), name in zip(outcomes, ("fox", "weather", "report")):
        assert code == 1000
        assert wer(clips[name].text, finals_text(messages)) <= 0.35, (name, finals_text(messages))


def test_encoded_container_stream(serve_app, clips):
    from media import encode

    data = encode(decode(clips["beckett"].path, max_duration_s=60).samples, "ogg-opus")

    async def go():
        async with websockets.connect(ws_url(serve_app, "encoding=ogg-opus"),
                                      additional_headers={"Authorization": f"Token {API_KEYS[0]}"}) as ws:
            for i in range(0, len(data), 4000):  # ~0.4 s of Opus per frame, sent 4x real time
                await ws.send(data[i : i + 4000])
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "CloseStream"}))
            return await drain(ws), ws.close_code

    messages, code = asyncio.run(go())
    assert code == 1000 and messages[-1]["type"] == "Metadata"
    assert messages[-1]["duration"] == pytest.approx(9.96, abs=0.1)
    assert wer(clips["beckett"].text, finals_text(messages)) <= 0.2
