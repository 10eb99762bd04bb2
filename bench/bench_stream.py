"""Streaming latency and accuracy on this machine, with the bundled model (issue #15's goals).

Figures, each from this one run:

- latency, on the espeak-ng three-voice conversation (10 utterances, 0.4 s pauses) streamed at
  real-time pace, three times over (~130 s): end of each utterance -> the first final result that
  reaches it (goal: median <= 1.0 s, default endpointing; ``speech_final`` also shown), start of speech -> the first result covering it
  (goal <= 1.5 s); and the lag of the first third against the last third (goal: not growing);
- accuracy: WER of the streamed finals against the reference and against the same file's batch
  transcript, at 1x and 2x real time (goal: within 2 points of batch), on pyannote's sample.wav
  (a real two-speaker conversation) and beckett.wav (six two-word phrases), the mean of
  ``--accuracy-runs`` streams of each (their spread shown); ``--clips FILE`` streams other clips
  instead (real speech with references, one clip per line) and adds the WER of all their words;
- in-process runs only: each decode's cost (interim and final), timed around the ASR call.

``--in-process`` runs the streaming session over a window scheduler and engine in this process,
as the ASR replica runs them (no Ray, no HTTP): quick to iterate on, and the way to compare
session options (``--context-s 0 --stream-floor-s 0`` is the session before left context and
short stream windows). Without it the figures come through the service's WebSocket API.

Usage: python bench/bench_stream.py [--in-process [--context-s 10] [--stream-floor-s 10]] [--clips FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

import assets  # noqa: E402
import conversation  # noqa: E402
from textnorm import wer  # noqa: E402

from pipeline.core.types import SAMPLE_RATE  # noqa: E402
from pipeline.transcription.render import strip_punctuation  # noqa: E402

KEY = "stream-key"
CHUNK_S = 0.1
# A stream: samples and a pace (x real time) -> [(seconds since the stream started, message)]
Streamer = Callable[[np.ndarray, float], Awaitable[list[tuple[float, dict]]]]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def paced(samples: np.ndarray, speed: float, send, receive_all) -> list[tuple[float, dict]]:
    """Send 0.1 s chunks by the clock (audio time = wall time x speed), then CloseStream, while
    collecting what comes back with its arrival time."""
    start = time.monotonic()
    step = int(16000 * CHUNK_S)

    async def sender() -> None:
        for n, i in enumerate(range(0, len(samples), step)):
            await asyncio.sleep(max(0.0, start + n * CHUNK_S / speed - time.monotonic()))
            await send(samples[i : i + step])
        await send(None)

    task = asyncio.create_task(sender())
    received = [(t - start, m) for t, m in await receive_all()]
    await task
    return received


def service_streamer(url: str) -> Streamer:
    import websockets

    async def stream(samples: np.ndarray, speed: float) -> list[tuple[float, dict]]:
        async with websockets.connect(url, additional_headers={"Authorization": f"Token {KEY}"}) as ws:
            async def send(chunk):
                if chunk is None:
                    await ws.send(json.dumps({"type": "CloseStream"}))
                else:
                    await ws.send((chunk * 32767).astype("<i2").tobytes())

            async def receive_all():
                return [(time.monotonic(), json.loads(raw)) async for raw in ws]

            return await paced(samples, speed, send, receive_all)

    return stream


def in_process_streamer(args, costs: list[tuple[bool, float, float]]) -> tuple[Streamer, Callable]:
    """The session over a scheduler worker thread and the CTranslate2 engine, as in the replica
    (submit in a thread, await the future); ``costs`` gets (interim, audio s, seconds) per decode."""
    from pipeline.asr.factory import build_engine
    from pipeline.asr.scheduler import WindowScheduler, step_audio_s
    from pipeline.core.settings import AsrSettings
    from pipeline.streaming.session import StreamingSession, StreamOptions

    settings = AsrSettings(stream_min_window_s=args.stream_floor_s)
    engine = build_engine(settings)
    scheduler = WindowScheduler(engine, max_batch_windows=settings.window_batch_size,
                                max_batch_audio_s=step_audio_s(settings, engine))
    scheduler.start()  # as the ASR replica does

    async def transcribe(audio, options):
        started = time.perf_counter()
        future = await asyncio.to_thread(scheduler.submit, audio, options, stream=options.stream,
                                         interim=options.interim)
        result = await asyncio.wrap_future(future)
        costs.append((options.interim, audio.duration_s, time.perf_counter() - started))
        return result

    async def stream(samples: np.ndarray, speed: float) -> list[tuple[float, dict]]:
        session = StreamingSession(transcribe, StreamOptions(context_s=args.context_s,
                                                             interim_context_s=args.interim_context_s,
                                                             first_interim_s=args.first_interim_s,
                                                             final_beam_size=args.final_beam_size,
                                                             unstable_tail_s=args.unstable_tail_s,
                                                             fragment_s=args.fragment_s,
                                                             fragment_endpointing_ms=args.fragment_endpointing_ms))
        queue: asyncio.Queue = asyncio.Queue()

        async def send(chunk):
            queue.put_nowait(chunk)

        async def receive_all():
            out = []
            while (chunk := await queue.get()) is not None:
                out += [(time.monotonic(), m) for m in await session.feed(chunk, behind=not queue.empty())]
            return out + [(time.monotonic(), m) for m in await session.finish()]

        return await paced(samples, speed, send, receive_all)

    return stream, scheduler.close


def batch_text(args, clip, base: str | None) -> str:
    if base is not None:
        import httpx

        r = httpx.post(f"{base}/v1/listen", files={"audio": clip.path.read_bytes()},
                       headers={"Authorization": f"Token {KEY}"}, timeout=300)
        r.raise_for_status()
        return r.json()["text"]
    from pipeline.asr.factory import build_engine
    from pipeline.audio.decode import decode
    from pipeline.core.settings import AsrSettings
    from pipeline.core.types import AsrOptions

    engine = batch_text.engine = getattr(batch_text, "engine", None) or build_engine(AsrSettings())
    return engine.transcribe([decode(clip.path, max_duration_s=600)], [AsrOptions()])[0].text


def latency(stream: Streamer, repeats: int) -> None:
    audio, reference = conversation.build()
    one = audio.duration_s
    samples = np.concatenate([audio.samples] * repeats)
    utterances = [(k * one + start, k * one + end, strip_punctuation(text.split()[-1]))
                  for k in range(repeats) for (_, start, end), (_, text) in zip(reference, conversation.LINES)]
    received = asyncio.run(stream(samples, 1.0))
    results = [(t, m) for t, m in received if m["type"] == "Results"]
    finals = [(t, m) for t, m in results if m["is_final"]]
    speech_finals = [(t, m) for t, m in results if m["speech_final"]]
    final_lag, first_lag, speech_final_lag = [], [], []
    for start, end, last in utterances:
        # The first final result that reaches the utterance's end (its last word final): one that
        # ends within 0.3 s of it, or holds its last word in its last 1.5 s (Whisper may time the
        # last word's end early: espeak's "today." fades out, "today!" ended 0.31 s before it).
        def reaches(m: dict) -> bool:
            return m["start"] <= end and (m["start"] + m["duration"] >= end - 0.3 or any(
                strip_punctuation(w["word"]).strip() == last and end - 1.5 <= w["start"] <= end for w in m["words"]))

        after = [t for t, m in finals if reaches(m)]
        final_lag.append(min(after) - end if after else float("nan"))
        after = [t for t, m in speech_finals if reaches(m)]
        speech_final_lag.append(min(after) - end if after else float("nan"))
        first = [t for t, m in results if m["start"] < end and m["start"] + m["duration"] > start]
        first_lag.append(min(first) - start if first else float("nan"))
    found = [x for x in final_lag if x == x]
    third = len(utterances) // 3
    print(f"\nconversation x{repeats}: {len(utterances)} utterances, {len(samples) / 16000:.1f} s, real time "
          f"(load {loadavg()})")
    print(f"  end of utterance -> final result: median {statistics.median(found):.2f} s, max {max(found):.2f} s, "
          f"{len(found)}/{len(utterances)} utterances (goal: median <= 1.0 s)")
    ended = [x for x in speech_final_lag if x == x]
    if ended:
        print(f"  end of utterance -> speech_final: median {statistics.median(ended):.2f} s "
              f"({len(ended)}/{len(utterances)} utterances ended by one: pauses of 0.4 s, endpointing 300 ms)")
    firsts = [x for x in first_lag if x == x]
    print(f"  start of speech -> first result:  median {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s "
          f"(goal <= 1.5 s)")
    early, late = [x for x in final_lag[:third] if x == x], [x for x in final_lag[-third:] if x == x]
    print(f"  final result lag, first third {statistics.median(early):.2f} s, last third {statistics.median(late):.2f} s "
          f"(goal: not growing)")
    print("  per utterance, final: " + " ".join(f"{x:.2f}" for x in final_lag))
    print("  per utterance, first: " + " ".join(f"{x:.2f}" for x in first_lag))


def accuracy(stream: Streamer, clips: dict, base: str | None, args) -> None:
    """Each clip streamed ``--accuracy-runs`` times at each pace: a stream's words depend on when
    its decodes ran (which audio each one held), so one run can be a few points off another.
    Several clips: also the WER of all their words together, batch and streamed."""
    from pipeline.audio.decode import decode
    from textnorm import corpus_wer

    pooled: dict[float, list[tuple[str, str, str]]] = {1.0: [], 2.0: []}  # (reference, batch, streamed)
    for name, clip in clips.items():
        batch = batch_text(args, clip, base)
        samples = decode(clip.path, max_duration_s=600).samples
        line = []
        for speed in (1.0, 2.0):
            runs, against_batch = [], []
            for _ in range(args.accuracy_runs):
                received = asyncio.run(stream(samples, speed))
                text = " ".join(m["text"] for _, m in received if m["type"] == "Results" and m["is_final"] and m["text"])
                runs.append(100 * wer(clip.text, text))
                against_batch.append(100 * wer(batch, text))
                pooled[speed].append((clip.text, batch, text))
                if args.verbose:
                    print(f"    {name} {speed:g}x: {text}")
            spread = f" (runs {', '.join(f'{x:.1f}' for x in runs)})" if len(runs) > 1 else ""
            line.append(f"{speed:g}x {statistics.mean(runs):5.1f} %{spread}, vs batch text "
                        f"{statistics.mean(against_batch):5.1f} %")
        if args.verbose:
            print(f"    {name} batch: {batch}")
        print(f"  {name:8} WER batch {100 * wer(clip.text, batch):5.1f} %; streamed finals (mean) " + "; ".join(line))
    if len(clips) > 1:
        words = sum(len(c.text.split()) for c in clips.values())
        for speed, texts in pooled.items():
            references, batches, streamed = zip(*texts)
            in_batch, in_stream = 100 * corpus_wer(references, batches), 100 * corpus_wer(references, streamed)
            print(f"  all {len(clips)} clips ({words} words) together, {speed:g}x: WER batch {in_batch:.1f} %, "
                  f"streamed {in_stream:.1f} %: {in_stream - in_batch:+.1f} points (goal within 2)")


def listed_clips(path: Path) -> dict:
    """Clips named in a file of lines ``name<TAB>reference<TAB>audio[ + audio ...]`` (``#``
    comments): several files are played one after the other with 0.5 s of silence between them,
    as one clip. Words in [brackets] or <angle brackets> (annotations) are left out of the reference."""
    import re
    import tempfile

    from media import wav_bytes

    from pipeline.audio.decode import decode

    clips, folder = {}, Path(tempfile.mkdtemp(prefix="bench-clips-"))
    gap = np.zeros(SAMPLE_RATE // 2, np.float32)
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, reference, files = line.split("\t")
        parts = [decode(Path(f.strip()).expanduser(), max_duration_s=600).samples for f in files.split(" + ")]
        samples = np.concatenate([x for part in parts for x in (part, gap)][:-1])
        wav = folder / f"{name}.wav"
        wav.write_bytes(wav_bytes(samples, SAMPLE_RATE))
        text = " ".join(re.sub(r"\[[^\]]*\]|<[^>]*>", " ", reference).split())
        clips[name] = assets.Clip(name, wav, text)
    return clips


def main() -> None:
    from pipeline.core.settings import AsrSettings
    from pipeline.streaming.session import StreamOptions

    parser = argparse.ArgumentParser()
    parser.add_argument("--in-process", action="store_true", help="session + scheduler in this process")
    parser.add_argument("--context-s", type=float, default=StreamOptions.context_s,
                        help="in-process: the session's left context")
    parser.add_argument("--interim-context-s", type=float, default=StreamOptions.interim_context_s,
                        help="in-process: an utterance's first interims' window, context included")
    parser.add_argument("--stream-floor-s", type=float, default=AsrSettings.model_fields["stream_min_window_s"].default,
                        help="in-process: stream decodes' window floor")
    parser.add_argument("--first-interim-s", type=float, default=StreamOptions.first_interim_s,
                        help="in-process: the first interim of an utterance, after this much of its speech")
    parser.add_argument("--unstable-tail-s", type=float, default=StreamOptions.unstable_tail_s,
                        help="in-process: interim words this close to the live edge are not final yet")
    parser.add_argument("--fragment-s", type=float, default=StreamOptions.fragment_s,
                        help="in-process: an utterance with less speech than this is a fragment")
    parser.add_argument("--fragment-endpointing-ms", type=int, default=StreamOptions.fragment_endpointing_ms,
                        help="in-process: the silence that ends a fragment; 0: endpointing's (300 ms)")
    parser.add_argument("--final-beam-size", type=lambda v: None if v == "none" else int(v), default=1,
                        help="beam width of the finals (the service's stream_final_beam_size); none: the engine's")
    parser.add_argument("--repeats", type=int, default=3, help="the conversation, this many times in one stream")
    parser.add_argument("--accuracy-runs", type=int, default=3, help="each clip streamed this many times at each pace")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--clips", type=Path, help="stream these clips for accuracy instead of sample.wav and beckett.wav: "
                        "lines of name<TAB>reference<TAB>audio[ + audio ...]")
    args = parser.parse_args()

    clips = assets.prepare()
    costs: list[tuple[bool, float, float]] = []
    base = None
    if args.in_process:
        stream, close = in_process_streamer(args, costs)
        print(f"in process: context {args.context_s:g} s, stream window floor {args.stream_floor_s:g} s")
    else:
        from bench_service import start_service

        base = start_service({"license_keys": [KEY], "stream_final_beam_size": args.final_beam_size or 0}, port=7173)
        stream = service_streamer(base.replace("http", "ws") + "/v1/listen/stream")
        print("through the service (WebSocket API)")
    print(f"finals' beam: {args.final_beam_size or 'the engine default'}")
    print(f"load average at start: {loadavg()}")
    asyncio.run(stream(conversation.build()[0].samples[: 16000 * 4], 4.0))  # warm-up
    costs.clear()
    if not args.skip_latency:
        latency(stream, args.repeats)
    if costs:
        for interim, label in ((True, "interim"), (False, "final")):
            mine = [(a, s) for i, a, s in costs if i == interim]
            if mine:
                print(f"  {label} decodes: {len(mine)}, median {statistics.median(s for _, s in mine):.2f} s "
                      f"(max {max(s for _, s in mine):.2f} s) for a median {statistics.median(a for a, _ in mine):.1f} s of audio")
    if not args.skip_accuracy:
        print(f"\nstreamed finals vs batch (load {loadavg()}):")
        chosen = listed_clips(args.clips) if args.clips else {name: clips[name] for name in ("sample", "beckett")}
        accuracy(stream, chosen, base, args)
    print(f"\nload average at end: {loadavg()}")
    if args.in_process:
        close()
    else:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
