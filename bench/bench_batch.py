"""hark batch (Ray Data) vs. a plain single-process faster-whisper loop, same files, same threads.

Usage: python bench/bench_batch.py [--copies 3]
Prints audio hours per hour for both, and the ratio (goal: batch >= 0.9x the loop on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import assets  # noqa: E402
from media import encode  # noqa: E402

from pipeline.audio.decode import decode  # noqa: E402
from pipeline.core.settings import Settings  # noqa: E402


def build_corpus(copies: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="hark-bench-corpus-"))
    encodings = ["wav", "mp3", "flac", "ogg-opus", "m4a-aac"]
    for i in range(copies):
        for j, (name, clip) in enumerate(assets.prepare().items()):
            samples = decode(clip.path, max_duration_s=600).samples
            enc = encodings[(i + j) % len(encodings)]
            (root / f"{name}-{i}.{enc.split('-')[0]}").write_bytes(encode(samples, enc))
    return root


def plain_loop(files: list[Path], settings: Settings) -> tuple[float, float]:
    from faster_whisper import WhisperModel
    from faster_whisper.vad import VadOptions

    from pipeline.asr.models import resolve_model

    started = time.perf_counter()
    model = WhisperModel(resolve_model(settings.asr.model, settings.asr.resolved_model_cache_dir), device="cpu",
                         compute_type=settings.asr.compute_type, cpu_threads=os.cpu_count())
    vad = VadOptions(min_silence_duration_ms=settings.asr.vad_min_silence_ms)
    audio_s = 0.0
    for path in files:
        audio = decode(path, max_duration_s=7200)
        segments, _ = model.transcribe(audio.samples, beam_size=settings.asr.beam_size, word_timestamps=True,
                                       vad_filter=True, vad_parameters=vad)
        list(segments)
        audio_s += audio.duration_s
    return audio_s, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=3)
    args = parser.parse_args()
    corpus = build_corpus(args.copies)
    files = sorted(corpus.iterdir())
    settings = Settings()
    audio_s, loop_wall = plain_loop(files, settings)
    print(f"corpus: {len(files)} files, {audio_s:.0f} s of audio, {os.cpu_count()} cores")
    print(f"plain faster-whisper loop: {loop_wall:6.1f} s  -> {audio_s / loop_wall:6.1f} audio hours per hour")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from hark.batch import run_batch

    ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024**2)
    out = Path(tempfile.mkdtemp(prefix="hark-bench-out-")) / "results"
    summary = run_batch(str(corpus), str(out), settings, progress=False)
    print(f"hark batch (Ray Data):     {summary.wall_s:6.1f} s  -> {summary.audio_hours_per_hour:6.1f} audio hours per hour")
    print(f"ratio batch / loop: {summary.audio_hours_per_hour / (audio_s / loop_wall):.2f}  ({summary})")
    ray.shutdown()


if __name__ == "__main__":
    main()
