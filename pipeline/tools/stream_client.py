"""``hark stream FILE``: play a file into /v1/listen/stream at real-time pace and print results."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from pipeline.audio.decode import decode


def linear16(samples: np.ndarray) -> bytes:
    """16 kHz mono float32 → the bytes of ``encoding=linear16``."""
    return (samples * 32767).astype("<i2").tobytes()


async def send_pcm(ws, pcm: bytes, *, speed: float = 1.0, chunk_s: float = 0.1, before: Sequence = ()) -> None:
    """Send ``before`` frames, then 16 kHz linear16 ``pcm`` in ``chunk_s`` frames at ``speed`` x
    real time, then CloseStream."""
    for frame in before:
        await ws.send(frame)
    step = int(32000 * chunk_s)
    for i in range(0, len(pcm), step):
        await ws.send(pcm[i : i + step])
        await asyncio.sleep(chunk_s / speed)
    await ws.send(json.dumps({"type": "CloseStream"}))


async def play(url: str, key: str, path: str, speed: float = 1.0, chunk_s: float = 0.1) -> int:
    import websockets

    pcm = linear16(decode(path, max_duration_s=7200).samples)
    started = time.monotonic()
    async with websockets.connect(url, additional_headers={"Authorization": f"Token {key}"}) as ws:
        sender = asyncio.create_task(send_pcm(ws, pcm, speed=speed, chunk_s=chunk_s))
        try:
            async for raw in ws:
                m = json.loads(raw)
                at = time.monotonic() - started
                if m["type"] == "Results":
                    mark = "FINAL" if m["is_final"] else "     "
                    print(f"{at:7.2f}s {mark} [{m['start']:7.2f}] {m['text']}", flush=True)
                else:
                    print(f"{at:7.2f}s {json.dumps(m)}", flush=True)
        except websockets.ConnectionClosed as exc:
            print(f"closed: {exc}", file=sys.stderr)
            return 1
        await sender
    return 0
