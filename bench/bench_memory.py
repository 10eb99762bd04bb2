"""Peak memory per replica while the service transcribes a 2 h file (review finding 16).

The decoded audio of 2 h is 460.8 MB of float32. It must go from AudioFetch to ASR and
diarization by object reference, never through the ingress. Prints, per replica, the resident
memory before the request and its peak during it (RSS, and PSS: shared pages divided among the
processes that map them), the object store's peak use, and the whole app's extra memory as a
multiple of the decoded audio.

It sends a 20 min file first, then the 2 h one (``--minutes``), to the same app, each measured
against the app just before it. Part of what a request holds does not grow with its length: each
ASR lane's decoding step (CTranslate2's working memory), the speaker models' batches. The last line separates the two: the 2 h file's peak over
the 20 min file's, against their difference in decoded audio, is the memory that grows with the
audio.

The file is 2 h of 8 kHz 8-bit WAV (57.6 MB, under the 100 MB upload cap): silence with a
test clip every 10 minutes (Beckett's, pyannote's two-speaker sample, espeak's sentences in
turn), so ASR and diarization do real work on little speech. ``--one-clip`` puts Beckett's clip
in every slot, as this bench did first: ASR then packs three copies of it into each 30 s window,
and Whisper's repetition check (compression ratio) sends every window through the temperature
fallback, which costs each decoding step ~3x the memory of a window of ordinary speech.

While it runs, ``--streams N`` live streams play Beckett's clip in a loop at real-time pace, and
``/health`` is asked every 0.2 s: its worst latency shows whether the ingress's event loop stays
free (review finding 13).

``--source url`` sends the file's URL instead (a loopback HTTP server serves it): the ingress
then never holds the file, only AudioFetch downloads it.

Usage: python bench/bench_memory.py [--minutes 20 120] [--no-diarize] [--streams 3] [--source upload|url]
Talks to loopback only; starts and stops its own Ray instance.
"""

from __future__ import annotations

import argparse
import functools
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import assets  # noqa: E402
from servers import MediaServer  # noqa: E402

from pipeline.audio.decode import decode  # noqa: E402
from pipeline.core.types import SAMPLE_RATE  # noqa: E402

KEY = "bench-key"
MB = 1e6


def decoded_mb(minutes: float) -> float:
    """The decoded audio of ``minutes`` as float32, the finding's measure."""
    return minutes * 60 * SAMPLE_RATE * 4 / MB


def long_file(minutes: float, one_clip: bool = False) -> bytes:
    rate = 8000
    clips = assets.prepare()
    names = ["beckett"] if one_clip else ["beckett", "sample"] + [name for name, *_ in assets.SENTENCES]
    speech = [decode(clips[name].path, max_duration_s=60).samples[::2] for name in names]  # 16 -> 8 kHz
    pcm = np.zeros(int(minutes * 60 * rate), np.float32)
    for slot, start in enumerate(range(0, len(pcm) - 60 * rate, 600 * rate)):
        clip = speech[slot % len(speech)]
        pcm[start:start + len(clip)] = clip
    data = (np.clip(pcm, -1, 1) * 127 + 128).astype(np.uint8).tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)
    return header + b"data" + struct.pack("<I", len(data)) + data


def replica_pids() -> dict[str, int]:
    """The replicas of this script's own Ray instance (its processes descend from this one), by
    deployment; the raylet, which maps the object store."""
    pids = {}
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica:hark:" in title:
            name = title.split("ServeReplica:hark:")[1].split()[0].split(".")[0]
            pids[f"{name} ({proc.pid})"] = proc.pid
        elif proc.name() == "raylet":
            pids["raylet (object store)"] = proc.pid
    return pids


def memory(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / MB, info.pss / MB


def rss_parts(pid: int) -> tuple[float, float]:
    """RSS in two parts: the process's own memory (RssAnon) and the shared memory it has touched
    (RssShmem: mostly Ray's object store, whose pages stay counted in a process that wrote or read
    an object there until it unmaps them, after the object is gone)."""
    parts = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssShmem:")):
                name, value = line.split(":")
                parts[name] = int(value.split()[0]) * 1024 / MB
    return parts.get("RssAnon", 0.0), parts.get("RssShmem", 0.0)


def object_store_used_mb() -> float:
    import ray
    from ray._private.internal_api import memory_summary

    try:
        # This script's own Ray instance: without an address it would find the newest one on the machine.
        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # noqa: BLE001 - a figure we can do without
        return float("nan")
    for line in summary.splitlines():
        if "Plasma memory usage" in line:  # "Plasma memory usage 440 MiB, 1 objects, 21.5% full, ..."
            return float(line.split("usage")[1].split("MiB")[0]) * 2**20 / MB
    return float("nan")


@dataclass
class Probes:
    """What the threads beside the requests record, for the whole run."""

    health_s: list[float] = field(default_factory=list)  # /health's answer times
    health_at: list[float] = field(default_factory=list)  # when each was asked, on time.perf_counter()
    proxy_s: list[float] = field(default_factory=list)  # /-/healthz: the proxy alone, not the ingress
    plays: list[int] = field(default_factory=list)  # final results of each play of the live streams


def one_request(args, minutes: float, pids: dict[str, int], media, base: str, probes: Probes, warm: float) -> float:
    """Send one ``minutes`` long file, sample every process while it runs, print its table, and
    return the most the app held at one moment (PSS). ``warm``: the app's PSS after its warm-up."""
    data = long_file(minutes, args.one_clip)
    decoded = decoded_mb(minutes)
    baseline = {name: memory(pid) for name, pid in pids.items()}
    store_baseline = object_store_used_mb()
    peak = dict(baseline)
    parts_peak = {name: rss_parts(pid) for name, pid in pids.items()}
    store_peak = store_baseline
    together_baseline = sum(pss for _, pss in baseline.values())
    together_peak = together_baseline
    at_peak: dict[str, float] = {}  # each process's PSS when the app held the most
    peak_at_s = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal store_peak, together_peak, at_peak, peak_at_s
        while not done.is_set():
            now = {}
            for name, pid in pids.items():
                rss, pss = memory(pid)
                peak[name] = (max(peak[name][0], rss), max(peak[name][1], pss))
                anon, shmem = rss_parts(pid)
                parts_peak[name] = (max(parts_peak[name][0], anon), max(parts_peak[name][1], shmem))
                now[name] = pss
            if sum(now.values()) > together_peak:
                together_peak, at_peak, peak_at_s = sum(now.values()), now, time.perf_counter() - started
            store_peak = max(store_peak, object_store_used_mb())
            done.wait(0.3)

    first_health, first_play = len(probes.health_s), len(probes.plays)
    media.files["long.wav"] = data
    if args.source == "url":
        request = {"json": {"url": media.url("/files/long.wav")}}
    else:
        request = {"content": data, "headers": {"Content-Type": "audio/wav"}}
    started = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    r = httpx.post(f"{base}/v1/listen", params={"diarize": str(not args.no_diarize).lower(), "timestamps": "true"},
                   headers={"Authorization": f"Token {KEY}", **request.pop("headers", {})}, timeout=3600, **request)
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    assert r.status_code == 200, r.text
    body = r.json()
    print(f"\n{minutes:g} min file by {args.source} ({len(data) / MB:.1f} MB WAV, {decoded:.1f} MB decoded), "
          f"diarize={not args.no_diarize}: answered in {elapsed:.0f} s, {len(body.get('words', []))} words, "
          f"{len(body.get('speakers') or [])} speaker turns")
    print(f"{'process':28} {'RSS before':>11} {'RSS peak':>10} {'PSS before':>11} {'PSS peak':>10} {'PSS extra':>10}"
          f" {'anon peak':>10} {'shmem peak':>11}")
    extra = 0.0
    for name in pids:
        (rss0, pss0), (rss1, pss1) = baseline[name], peak[name]
        extra += pss1 - pss0
        print(f"{name:28} {rss0:9.0f}MB {rss1:8.0f}MB {pss0:9.0f}MB {pss1:8.0f}MB {pss1 - pss0:8.0f}MB"
              f" {parts_peak[name][0]:8.0f}MB {parts_peak[name][1]:9.0f}MB")
    print("(anon: a process's own memory; shmem: shared memory it has touched, mostly Ray's object store; each "
          "column's peak on its own)")
    print(f"object store: {store_baseline:.0f} MB before, {store_peak:.0f} MB at peak")
    took, proxy_s = probes.health_s[first_health:], probes.proxy_s
    if took:
        at = [t - started for t in probes.health_at[first_health:]]
        print(f"/health during the request: {len(took)} answers, median {1000 * sorted(took)[len(took) // 2]:.0f} ms, "
              f"worst {1000 * max(took):.0f} ms; {args.streams} live streams finished {len(probes.plays) - first_play} "
              f"plays with {sum(probes.plays[first_play:])} final results")
        slowest = sorted(zip(took, at), reverse=True)[:5]
        print("  slowest: " + ", ".join(f"{1000 * s:.0f} ms at {t:.1f} s" for s, t in slowest)
              + f" (the request was answered at {elapsed:.1f} s)")
        print(f"  over 100 ms: {sum(s > 0.1 for s in took)} of {len(took)}; Serve's proxy alone (/-/healthz, whole "
              f"run so far): median {1000 * sorted(proxy_s)[len(proxy_s) // 2]:.0f} ms, worst "
              f"{1000 * max(proxy_s):.0f} ms, {sum(s > 0.1 for s in proxy_s)} of {len(proxy_s)} over 100 ms")
    print(f"whole app extra memory (sum of PSS peaks over baselines): {extra:.0f} MB = "
          f"{extra / decoded:.2f}x the decoded audio")
    # The peaks above come at different moments; this is the most the app held at one moment.
    held = together_peak - together_baseline
    print(f"whole app extra memory at its peak (PSS of all processes sampled together): {held:.0f} MB = "
          f"{held / decoded:.2f}x the decoded audio, {peak_at_s:.0f} s after the request was sent; of it:")
    for name, pss in sorted(at_peak.items(), key=lambda item: baseline[item[0]][1] - item[1]):
        if abs(pss - baseline[name][1]) >= 5:
            print(f"  {name:28} {pss - baseline[name][1]:+8.0f} MB")
    if together_baseline - warm >= 5:  # what earlier requests left allocated (kept for reuse) counts too
        print(f"  over the app's baseline after its warm-up ({warm:.0f} MB): {together_peak - warm:.0f} MB = "
              f"{(together_peak - warm) / decoded:.2f}x the decoded audio")
    return together_peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, nargs="+", default=[20, 120],
                        help="one request per length, in turn, on the same app (the shortest is the reference for "
                             "memory that grows with the audio)")
    parser.add_argument("--no-diarize", action="store_true")
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--source", choices=["upload", "url"], default="upload")
    parser.add_argument("--one-clip", action="store_true", help="Beckett's clip in every slot (see above)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.launch import front_first

    front_first()  # as `hark serve` starts a local Ray: the HTTP front outranks the compute replicas
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    options = {d.pop("name"): d for d in config["applications"][0]["deployments"]}
    ray.init(address="local", num_cpus=4, object_store_memory=2 * 1024**3, include_dashboard=False, log_to_driver=False)
    port = 7172
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 3600})
    settings = {"license_keys": [KEY], "url_allowlist": ["127.0.0.1/32"]}
    serve.run(build_app({"settings": settings, "deployment_options": options}), name="hark", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while httpx.get(f"{base}/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the app did not get ready"
        time.sleep(1)
    pids = replica_pids()
    assert sum("(" in n and "raylet" not in n for n in pids) >= 6, pids
    cold = sum(pss for _, pss in (memory(pid) for pid in pids.values()))
    # The baseline is a server that has answered a request: what each replica loads or allocates
    # on first use (Silero VAD, the decoder's buffers, the speaker models' first batch) is not
    # memory of the long file. A 30 s diarized request warms every part up.
    warm_up = httpx.post(f"{base}/v1/listen", params={"diarize": "true", "timestamps": "true"},
                         headers={"Authorization": f"Token {KEY}", "Content-Type": "audio/wav"},
                         content=assets.prepare()["sample"].path.read_bytes(), timeout=600)
    assert warm_up.status_code == 200, warm_up.text
    stop = threading.Event()
    probes = Probes()

    def ask(path: str, took: list[float], at: list[float] | None = None) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                client.get(f"{base}{path}").raise_for_status()
                took.append(time.perf_counter() - t0)
                if at is not None:
                    at.append(t0)
                stop.wait(0.2)


    def stream() -> None:
        import asyncio

        import websockets

        from pipeline.tools.stream_client import linear16, send_pcm

        pcm = linear16(decode(assets.prepare()["beckett"].path, max_duration_s=60).samples)

        async def run() -> None:
            url = f"ws://127.0.0.1:{port}/v1/listen/stream?encoding=linear16&sample_rate=16000"
            while not stop.is_set():
                async with websockets.connect(url, additional_headers={"Authorization": f"Token {KEY}"}) as ws:
                    sender = asyncio.create_task(send_pcm(ws, pcm))
                    finals = 0
                    async for raw in ws:
                        finals += '"is_final": true' in raw or '"is_final":true' in raw
                    await sender
                probes.plays.append(finals)

        asyncio.run(run())

    warm = sum(memory(pid)[1] for pid in pids.values())
    print(f"baseline: the app's PSS {warm:.0f} MB after a 30 s warm-up request ({cold:.0f} MB cold)")
    asks = [functools.partial(ask, "/health", probes.health_s, probes.health_at),
            functools.partial(ask, "/-/healthz", probes.proxy_s)]
    threads = [threading.Thread(target=f, daemon=True) for f in (*asks, *[stream] * args.streams)]
    for thread in threads:
        thread.start()
    media = MediaServer().__enter__()
    at_once: dict[float, float] = {}  # minutes -> the most the app held at one moment (PSS)
    for minutes in args.minutes:
        at_once[minutes] = one_request(args, minutes, pids, media, base, probes, warm)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    media.__exit__(None, None, None)
    if len(at_once) > 1:
        # What grows with the audio, apart from what any request of this service holds while it runs
        # (a decoding step's working memory in ASR, the speaker models' batch): the longest file's
        # peak over the shortest's, against the difference of their decoded audio.
        short, long = min(at_once), max(at_once)
        grown = at_once[long] - at_once[short]
        decoded = decoded_mb(long) - decoded_mb(short)
        fixed = at_once[short] - warm - grown / decoded * decoded_mb(short)
        print(f"\nmemory that grows with the audio: the app's peak at {long:g} min less its peak at {short:g} min: "
              f"{grown:+.0f} MB for {decoded:.0f} MB more decoded audio = {grown / decoded:.2f}x; what a request "
              f"holds whatever its length (the {short:g} min peak over the warm baseline, less that slope's "
              f"share): {fixed:.0f} MB")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
