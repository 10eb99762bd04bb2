"""The window scheduler (the ASR replica's decoding loop) against the sequential in-process
faster-whisper loop, side by side in one run, on the same model and cores (issue #15's goals).

The scheduler runs as in the replica: a worker thread decoding steps, requests submitted from
client threads. The loop is what the engine did before: ``WhisperModel.transcribe`` (VAD, word
timestamps, the configured beam) on each request in turn. Figures:

- mix: 4 concurrent clients over short clips (1–10 s, English, Spanish, French) and a 60 s clip;
  throughput (audio s / wall s) of each, and the ratio (goal ≥ 1.5×);
- one 60 s clip alone: latency of each, and the ratio (goal ≤ 0.7×);
- a 10 s request sent while a 10-minute file is being decoded: its latency over its solo latency
  (goal ≤ 2×); the long file is then cancelled;
- WER of the loop and the scheduler over the clips with references (goal: within 0.5 point).

The machine's load average is printed with the figures: ratios of runs made side by side are what
count on a shared machine.

Usage: python bench/bench_scheduler.py [--batch-windows 8] [--batch-audio-s 60] [--skip-long]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHORT = ["beckett", "fox", "stella", "meeting", "spanish", "french", "speech", "weather"]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-windows", type=int, default=8)
    parser.add_argument("--batch-audio-s", type=float, default=None, help="HARK_ASR__MAX_BATCH_AUDIO_S (default: the setting's)")
    parser.add_argument("--parallel-steps", type=int, default=0, help="HARK_ASR__PARALLEL_STEPS (0: one per core)")
    parser.add_argument("--cpu-threads", type=int, default=0, help="HARK_ASR__CPU_THREADS (0: automatic)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--min-window-s", type=float, default=None, help="HARK_ASR__MIN_WINDOW_S (default: the setting's)")
    parser.add_argument("--max-window-s", type=float, default=None, help="HARK_ASR__MAX_WINDOW_S (default: the setting's)")
    parser.add_argument("--skip-long", action="store_true", help="leave out the 10-minute file")
    parser.add_argument("--only-long", action="store_true", help="only the 10-minute file scenario")
    args = parser.parse_args()

    import numpy as np

    import assets

    from pipeline.asr.factory import build_engine
    from pipeline.asr.scheduler import WindowScheduler, step_audio_s
    from pipeline.audio.decode import decode
    from pipeline.core.settings import AsrSettings
    from pipeline.core.types import AsrOptions, Audio

    clips = assets.prepare()
    audio = {name: decode(clips[name].path, max_duration_s=7200) for name in [*SHORT, "sample"]}
    # The 60 s clip: pyannote's 30 s conversation twice, with its reference twice.
    sixty = Audio(np.concatenate([audio["sample"].samples, audio["sample"].samples]))
    references = {name: clips[name].text for name in SHORT} | {"sixty": clips["sample"].text + " " + clips["sample"].text}
    work = {name: audio[name] for name in SHORT} | {"sixty": sixty}
    total_s = sum(a.duration_s for a in work.values())

    windows = {k: v for k, v in (("min_window_s", args.min_window_s), ("max_window_s", args.max_window_s)) if v is not None}
    settings = AsrSettings(window_batch_size=args.batch_windows, max_batch_audio_s=args.batch_audio_s,
                           parallel_steps=args.parallel_steps, cpu_threads=args.cpu_threads, **windows)
    engine = build_engine(settings)
    # The loop: faster-whisper as a user runs it, on the same weights with its own defaults
    # (CTranslate2 then picks its threads: all cores, up to 4).
    from faster_whisper import WhisperModel

    from pipeline.asr.models import resolve_model

    model_path = resolve_model(settings.model, settings.resolved_model_cache_dir)
    model = WhisperModel(model_path, device="cpu", compute_type=settings.compute_type)
    options = AsrOptions(word_timestamps=True)

    def loop_one(a: Audio) -> str:
        segments, _ = model.transcribe(a.samples, beam_size=settings.beam_size, word_timestamps=True, vad_filter=True)
        return "".join(s.text for s in segments)

    budget = step_audio_s(settings, engine)
    scheduler = WindowScheduler(engine, max_batch_windows=args.batch_windows, max_batch_audio_s=budget)
    workers = scheduler.start()

    def timed(fn, *a):
        started = time.perf_counter()
        out = fn(*a)
        return out, time.perf_counter() - started

    loop_one(audio["fox"])  # warm-up (model pages, VAD model)
    scheduler.submit(audio["fox"], options).result()
    print(f"load average at start: {loadavg()}; step: {args.batch_windows} windows, {budget:g} s of audio at most; "
          f"{engine.lanes} lanes{' + express' if engine.express_lane else ''}; windows {settings.min_window_s:g}-{settings.max_window_s:g} s")

    if not args.only_long:
        mix_wer_and_sixty(args, work, total_s, references, loop_one, scheduler, options, timed, sixty)
    if not args.skip_long:
        during_long_file(scheduler, audio, options, timed)
    scheduler.close()
    for worker in workers:  # a step still running ends first (CTranslate2 must not be torn down under it)
        worker.join()
    print(f"\nload average at end: {loadavg()}")


def mix_wer_and_sixty(args, work, total_s, references, loop_one, scheduler, options, timed, sixty) -> None:
    from textnorm import corpus_wer, wer

    # --- 1. the mix: the loop in turn, the scheduler with N concurrent clients ---------------------
    loop_texts: dict[str, str] = {}
    started = time.perf_counter()
    for name, a in work.items():
        loop_texts[name] = loop_one(a)
    loop_s = time.perf_counter() - started

    sched_texts: dict[str, str] = {}
    todo = list(work.items())
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                name, a = todo.pop(0)
            sched_texts[name] = scheduler.submit(a, options).result().text

    started = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(args.clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    sched_s = time.perf_counter() - started
    print(f"\nmix of {len(work)} requests, {total_s:.1f} s of audio, {args.clients} clients (load {loadavg()}):")
    print(f"  loop      {loop_s:7.2f} s  throughput {total_s / loop_s:6.2f} audio s/s")
    print(f"  scheduler {sched_s:7.2f} s  throughput {total_s / sched_s:6.2f} audio s/s"
          f"  ratio {loop_s / sched_s:.2f}x (goal >= 1.5x)")

    # --- 2. WER over the clips with references ---------------------------------------------------
    def mean_wer(texts):
        return 100 * sum(wer(references[n], texts[n]) for n in work) / len(work)

    def pooled_wer(texts):
        return 100 * corpus_wer([references[n] for n in work], [texts[n] for n in work])

    loop_wer, sched_wer = mean_wer(loop_texts), mean_wer(sched_texts)
    print(f"\nWER (mean over {len(work)} clips): loop {loop_wer:.2f} %, scheduler {sched_wer:.2f} %"
          f"  difference {sched_wer - loop_wer:+.2f} points (goal within 0.5)")
    loop_pooled, sched_pooled = pooled_wer(loop_texts), pooled_wer(sched_texts)
    print(f"WER (all {sum(len(references[n].split()) for n in work)} words together): loop {loop_pooled:.2f} %, "
          f"scheduler {sched_pooled:.2f} %  difference {sched_pooled - loop_pooled:+.2f} points")
    for n in work:
        if loop_texts[n].strip() != sched_texts[n].strip():
            print(f"  {n}: loop {wer(references[n], loop_texts[n]):.3f}  scheduler {wer(references[n], sched_texts[n]):.3f}")

    # --- 3. one 60 s clip alone --------------------------------------------------------------------
    _, loop_60 = timed(loop_one, sixty)
    _, sched_60 = timed(lambda: scheduler.submit(sixty, options).result())
    print(f"\none 60 s clip alone (load {loadavg()}): loop {loop_60:.2f} s, scheduler {sched_60:.2f} s"
          f"  ratio {sched_60 / loop_60:.2f}x (goal <= 0.7x)")



def during_long_file(scheduler, audio, options, timed) -> None:
    import numpy as np

    from pipeline.core.types import Audio

    # --- 4. a 10 s request during a 10-minute file ---------------------------------------------------
    short = audio["beckett"]
    _, solo = timed(lambda: scheduler.submit(short, options).result())
    ten_min = Audio(np.tile(np.concatenate([audio["sample"].samples, np.zeros(16000 * 2, np.float32)]), 19)[: 600 * 16000])
    long_future = scheduler.submit(ten_min, options)
    deadline = time.monotonic() + 120
    total_windows = scheduler.queued_windows()
    while scheduler.queued_windows() >= total_windows and time.monotonic() < deadline:
        time.sleep(0.05)  # until the long file's first step is running
    _, during = timed(lambda: scheduler.submit(short, options).result())
    # Again once the file's steps fill every lane (its language known, several windows started),
    # half a step later: no lane free but the express one.
    while scheduler.queued_windows() > total_windows - 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    _, during_full = timed(lambda: scheduler.submit(short, options).result())
    scheduler.cancel(long_future)
    print(f"\n10 s request during a 10-minute file (load {loadavg()}): solo {solo:.2f} s; sent as the file's first step "
          f"starts {during:.2f} s, ratio {during / solo:.2f}x; sent while its steps fill every lane {during_full:.2f} s, "
          f"ratio {during_full / solo:.2f}x (goal <= 2x)")
    # The loop's own figure for the same situation: the short request waits for the whole file.
    print("  (the loop answers it only after the whole 10-minute file)")


if __name__ == "__main__":
    main()
