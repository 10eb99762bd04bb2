"""Drive the app at 1x, 2x and 5x its capacity; print what came back.

Capacity is measured first (closed loop, 2 clients). Each level then offers requests at
k x capacity per second (open loop, Poisson arrivals) for --seconds, and waits for every answer.
Loopback only, bounded in count (--max-requests per level) and time (per-request timeout).

Usage: python bench/load.py [--seconds 30] [--clip beckett]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import random
import statistics
import time

import httpx

from bench_service import start_service

import assets  # noqa: E402  (bench_service puts tests/ on the path)

KEY = "load-key"


def one(client: httpx.Client, payload: bytes) -> tuple[int | None, float, float]:
    started = time.perf_counter()
    try:
        r = client.post("/v1/listen", files={"audio": payload})
        duration = r.json().get("duration", 0.0) if r.status_code == 200 else 0.0
        return r.status_code, time.perf_counter() - started, duration
    except httpx.HTTPError:
        return None, time.perf_counter() - started, 0.0


def level(base: str, payload: bytes, rate: float, seconds: float, max_requests: int) -> dict:
    rng = random.Random(7)
    client = httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Token {KEY}"},
                          limits=httpx.Limits(max_connections=400))
    futures = []
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(256) as pool:
        next_at = started
        while time.perf_counter() - started < seconds and len(futures) < max_requests:
            next_at += rng.expovariate(rate)
            time.sleep(max(0.0, next_at - time.perf_counter()))
            futures.append(pool.submit(one, client, payload))
        results = [f.result() for f in futures]
    wall = time.perf_counter() - started
    codes = collections.Counter(code for code, _, _ in results)
    ok = sorted(lat for code, lat, _ in results if code == 200)
    return {
        "sent": len(results),
        "codes": codes,
        "p50": statistics.median(ok) if ok else float("nan"),
        "p99": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else float("nan"),
        "audio_per_s": sum(d for code, _, d in results if code == 200) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=400)
    parser.add_argument("--clip", default="beckett")
    args = parser.parse_args()
    payload = assets.prepare()[args.clip].path.read_bytes()
    base = start_service({"license_keys": [KEY], "limits": {"requests_per_minute": 0, "concurrent_requests": 0, "audio_hours_per_day": 0}}, port=7172)
    client = httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Token {KEY}"})
    one(client, payload)  # warm-up
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: one(client, payload), range(8)))
    capacity = 8 / (time.perf_counter() - started)
    print(f"capacity: {capacity:.2f} requests/s of the '{args.clip}' clip (closed loop, 2 clients)\n")
    print(f"{'load':>5} {'offered/s':>9} {'sent':>5} {'200':>5} {'429':>5} {'503':>5} {'other':>5} {'no answer':>9} "
          f"{'p50 s':>7} {'p99 s':>7} {'audio s/s':>9}")
    rows = {}
    for k in (1, 2, 5):
        row = rows[k] = level(base, payload, k * capacity, args.seconds, args.max_requests)
        codes = row["codes"]
        other = sum(n for c, n in codes.items() if c not in (200, 429, 503, None))
        print(f"{k:>4}x {k * capacity:9.2f} {row['sent']:5d} {codes[200]:5d} {codes[429]:5d} {codes[503]:5d} {other:5d} "
              f"{codes[None]:9d} {row['p50']:7.2f} {row['p99']:7.2f} {row['audio_per_s']:9.2f}")
    print(f"\nthroughput at 5x / at 1x: {rows[5]['audio_per_s'] / rows[1]['audio_per_s']:.2f}")

    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
