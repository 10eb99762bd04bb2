"""Streaming latency and accuracy on this machine, with the bundled model.

Streams the espeak-ng three-voice conversation (10 utterances, 0.4 s pauses) at real-time pace and
measures, per utterance: end of speech -> its speech_final result, and start of speech -> the
first interim result covering it. Also WER of streaming vs. batch on pyannote's sample.

Usage: python bench/bench_stream.py
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import websockets  # noqa: E402

import assets  # noqa: E402
import conversation  # noqa: E402
from bench_service import start_service  # noqa: E402
from textnorm import wer  # noqa: E402

KEY = "stream-key"


async def timed_stream(url: str, samples, chunk_s: float = 0.1):
    pcm = (samples * 32767).astype("<i2").tobytes()
    received = []
    async with websockets.connect(url, additional_headers={"Authorization": f"Token {KEY}"}) as ws:
        start = time.monotonic()

        async def send():
            step = int(32000 * chunk_s)
            for n, i in enumerate(range(0, len(pcm), step)):
                # Pace by the clock, not by sleeps: audio time = wall time since start.
                await asyncio.sleep(max(0.0, start + n * chunk_s - time.monotonic()))
                await ws.send(pcm[i : i + step])
            await ws.send(json.dumps({"type": "CloseStream"}))

        sender = asyncio.create_task(send())
        async for raw in ws:
            received.append((time.monotonic() - start, json.loads(raw)))
        await sender
    return received


def main() -> None:
    clips = assets.prepare()
    base = start_service({"license_keys": [KEY]}, port=7173)
    url = base.replace("http", "ws") + "/v1/listen/stream"
    audio, reference = conversation.build()
    received = asyncio.run(timed_stream(url, audio.samples))
    finals = [(t, m) for t, m in received if m["type"] == "Results" and m["speech_final"]]
    interims = [(t, m) for t, m in received if m["type"] == "Results"]
    final_lat, interim_lat = [], []
    for _, start, end in reference:
        after = [t for t, m in finals if m["start"] + m["duration"] >= end - 0.3 and m["start"] <= end]
        if after:
            final_lat.append(min(after) - end)
        first = [t for t, m in interims if m["start"] < end and m["start"] + m["duration"] > start]
        if first:
            interim_lat.append(min(first) - start)
    print(f"conversation: {len(reference)} utterances, {audio.duration_s:.1f} s, streamed at real time")
    print(f"end of utterance -> speech_final:   median {statistics.median(final_lat):.2f} s, max {max(final_lat):.2f} s "
          f"({len(final_lat)}/{len(reference)} utterances)")
    print(f"start of speech -> first result:    median {statistics.median(interim_lat):.2f} s, max {max(interim_lat):.2f} s")

    from pipeline.audio.decode import decode

    sample = decode(clips["sample"].path, max_duration_s=600)
    streamed = asyncio.run(timed_stream(url, sample.samples))
    text = " ".join(m["text"] for _, m in streamed if m["type"] == "Results" and m["is_final"] and m["text"])
    batch = httpx.post(f"{base}/v1/listen", files={"audio": clips["sample"].path.read_bytes()},
                       headers={"Authorization": f"Token {KEY}"}, timeout=300).json()["text"]
    print(f"WER on sample.wav: streaming {wer(clips['sample'].text, text):.1%}, batch {wer(clips['sample'].text, batch):.1%}")

    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
