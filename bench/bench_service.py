"""Server overhead vs. the raw engine, on this machine, with the bundled model.

Prints, in one run:
  * latency of a 60 s clip: raw faster-whisper in-process vs. POST /v1/listen (upload);
  * throughput (audio seconds per second) over a clip set at concurrency 1 and 4, both ways;
  * the ratios (server cost over the raw engine);
  * WER of the service on pyannote's sample and on the espeak-ng sentences.

Usage: python bench/bench_service.py [--repeats 3]
Talks to loopback only; starts and stops its own Ray instance.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import assets  # noqa: E402
from media import wav_bytes  # noqa: E402
from textnorm import wer  # noqa: E402

from pipeline.audio.decode import decode  # noqa: E402
from pipeline.core.settings import Settings  # noqa: E402

KEY = "bench-key"


def build_clips():
    clips = assets.prepare()
    pieces, words = [], []
    for name in ["sample", "beckett", *[n for n, _, _ in assets.SENTENCES]]:
        pieces.append(decode(clips[name].path, max_duration_s=7200).samples)
        pieces.append(np.zeros(8000, dtype=np.float32))
        words.append(clips[name].text)
    long = np.concatenate(pieces)[: 60 * 16000]
    clip_set = {name: clips[name].path.read_bytes() for name in ["sample", "beckett", *[n for n, _, _ in assets.SENTENCES]]}
    return clips, wav_bytes(long), clip_set


def raw_engine(settings: Settings):
    from faster_whisper import WhisperModel
    from faster_whisper.vad import VadOptions

    from pipeline.asr.models import resolve_model

    model = WhisperModel(
        resolve_model(settings.asr.model, settings.asr.resolved_model_cache_dir),
        device="cpu", compute_type=settings.asr.compute_type, cpu_threads=os.cpu_count(),
    )

    vad = VadOptions(min_silence_duration_ms=settings.asr.vad_min_silence_ms)

    def run(data: bytes) -> float:
        audio = decode(data, max_duration_s=7200)
        # The same decoding options as the service's engine, so that only the server differs.
        segments, _ = model.transcribe(
            audio.samples, beam_size=settings.asr.beam_size, word_timestamps=True,
            vad_filter=settings.asr.vad_filter, vad_parameters=vad,
        )
        list(segments)
        return audio.duration_s

    return run


def throughput(fn, payloads: list[bytes], concurrency: int) -> float:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        audio_s = sum(pool.map(fn, payloads))
    return audio_s / (time.perf_counter() - start)


def start_service(settings_overrides: dict, port: int = 7171) -> str:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.launch import front_first

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app_cfg = config["applications"][0]
    options = {d.pop("name"): d for d in app_cfg["deployments"]}
    front_first()  # as `hark serve` starts a local Ray
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 3600})
    serve.run(build_app({"settings": settings_overrides, "deployment_options": options}), name="hark", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clips, long_wav, clip_set = build_clips()
    settings = Settings(license_keys=[KEY])
    payloads = list(clip_set.values()) * 2
    total_audio = sum(decode(p, max_duration_s=7200).duration_s for p in payloads)
    print(f"machine: {os.cpu_count()} cores; model {settings.asr.model} {settings.asr.compute_type}, beam {settings.asr.beam_size}")
    print(f"clip set: {len(payloads)} requests, {total_audio:.1f} s of audio; long clip 60.0 s\n")

    raw = raw_engine(settings)
    raw(long_wav)  # warm-up
    raw_latency = statistics.median(_timed(raw, long_wav) for _ in range(args.repeats))
    raw_c1 = throughput(raw, payloads, 1)
    raw_c4 = throughput(raw, payloads, 4)
    del raw

    base = start_service({"license_keys": [KEY]})
    client = httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Token {KEY}"})

    def post(data: bytes) -> float:
        r = client.post("/v1/listen", files={"audio": data})
        r.raise_for_status()
        return r.json()["duration"]

    post(long_wav)  # warm-up
    svc_latency = statistics.median(_timed(post, long_wav) for _ in range(args.repeats))
    svc_c1 = throughput(post, payloads, 1)
    svc_c4 = throughput(post, payloads, 4)

    sample_text = client.post("/v1/listen", files={"audio": clip_set["sample"]}).json()["text"]
    espeak_wers = []
    for name, _, text in assets.SENTENCES:
        hyp = client.post("/v1/listen", files={"audio": clip_set[name]}).json()["text"]
        espeak_wers.append(wer(text, hyp))

    plain = statistics.median(_timed(post, clip_set["sample"]) for _ in range(args.repeats))

    def post_diarized(data: bytes) -> float:
        r = client.post("/v1/listen", files={"audio": data}, data={"diarize": "true"})
        r.raise_for_status()
        return r.json()["duration"]

    diarized = statistics.median(_timed(post_diarized, clip_set["sample"]) for _ in range(args.repeats))

    print(f"{'measure':38} {'raw engine':>12} {'service':>12} {'server cost':>12}")
    print(f"{'60 s clip latency (s)':38} {raw_latency:12.2f} {svc_latency:12.2f} {svc_latency / raw_latency - 1:+12.1%}")
    print(f"{'throughput c=1 (audio s / s)':38} {raw_c1:12.2f} {svc_c1:12.2f} {raw_c1 / svc_c1 - 1:+12.1%}")
    print(f"{'throughput c=4 (audio s / s)':38} {raw_c4:12.2f} {svc_c4:12.2f} {raw_c4 / svc_c4 - 1:+12.1%}")
    print(f"{'sample.wav (30 s) latency, diarize':38} {plain:12.2f} {diarized:12.2f} {diarized / plain - 1:+12.1%}"
          "   (service plain vs. service with diarize)")
    print(f"\nWER sample.wav (vs STM): {wer(clips['sample'].text, sample_text):.1%}")
    print(f"WER espeak set ({len(espeak_wers)} sentences, mean): {statistics.mean(espeak_wers):.1%}")

    from ray import serve
    import ray

    serve.shutdown()
    ray.shutdown()


def _timed(fn, data) -> float:
    start = time.perf_counter()
    fn(data)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
