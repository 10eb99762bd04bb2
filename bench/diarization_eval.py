"""DER of the bundled diarizer on pyannote's sample and on a synthetic 3-voice conversation.

Usage: python bench/diarization_eval.py [--grid]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import assets  # noqa: E402
import conversation  # noqa: E402
from pipeline.audio import decode  # noqa: E402
from pipeline.diarization import ClusteringConfig, DiarizationOptions, EmbeddingClusteringDiarizer  # noqa: E402
from pipeline.scoring import der, read_rttm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", action="store_true")
    args = parser.parse_args()
    clips = assets.prepare()
    sample = decode(clips["sample"].path, max_duration_s=7200)
    sample_ref = read_rttm(assets.CACHE / "pyannote/audio/sample/sample.rttm")
    conv_audio, conv_ref = conversation.build()
    diarizer = EmbeddingClusteringDiarizer()
    configs = [diarizer.config]
    if args.grid:
        configs = [
            replace(diarizer.config, window_frames=w, hop_s=h, eigengap_threshold=p)
            for w, h, p in itertools.product([80, 120, 160], [0.2, 0.4], [0.05, 0.1, 0.2])
        ]
    for cfg in configs:
        diarizer.config = cfg
        row = [f"win {cfg.window_frames * 10} ms hop {cfg.hop_s} p {cfg.eigengap_threshold}"]
        for audio, ref in ((sample, sample_ref), (conv_audio, conv_ref)):
            t = time.perf_counter()
            hyp = diarizer.diarize(audio, DiarizationOptions())
            elapsed = time.perf_counter() - t
            n = len(hyp.speakers)
            row.append(f"DER {der(ref, hyp.turns, 0.0):5.1%} / {der(ref, hyp.turns, 0.25):5.1%} spk {n} {elapsed:4.1f}s")
        print(" | ".join(row))


if __name__ == "__main__":
    main()
