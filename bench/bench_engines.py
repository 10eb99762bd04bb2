"""The three ASR engines on the same clips and the same model (bundled whisper-base), in-process.

For each engine: load time; batch 1 (the 8 clips one call each) and batch 8 (one call with all 8)
wall time and real-time factor (wall / audio seconds); WER of each clip set. Greedy decoding
(beam 1) everywhere, because vLLM decodes greedily; word timestamps on where the engine gives
them; the language is detected (not given). CTranslate2 runs int8 (its CPU default) and float32
(the precision the transformers and vLLM engines run at on a CPU).

Usage: python bench/bench_engines.py [--engines ctranslate2,ctranslate2-fp32,transformers,vllm]
vLLM runs in the environment scripts/vllm-env.sh builds. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

if TYPE_CHECKING:
    from pipeline.core.types import Audio

ESPEAK = ["fox", "stella", "meeting", "speech", "weather", "report"]
CLIPS = ["beckett", "sample", *ESPEAK]


def load_clips() -> list[tuple[str, "Audio", str]]:
    """The clips of ``CLIPS`` (tests/assets.py), decoded: (name, audio, reference text)."""
    import assets

    from pipeline.audio.decode import decode

    prepared = assets.prepare()
    return [(name, decode(prepared[name].path, max_duration_s=7200), prepared[name].text) for name in CLIPS]


def measure(engine_name: str) -> dict:
    import numpy as np

    from textnorm import wer

    from pipeline.asr.factory import build_engine
    from pipeline.core.settings import AsrSettings
    from pipeline.core.types import AsrOptions

    clips = load_clips()
    references = {name: text for name, _, text in clips}
    audios = [audio for _, audio, _ in clips]
    audio_s = sum(a.duration_s for a in audios)
    engine, _, precision = engine_name.partition("-")
    settings = AsrSettings(engine=engine, beam_size=1, compute_type="float32" if precision == "fp32" else "int8")
    started = time.perf_counter()
    asr = build_engine(settings)
    load_s = time.perf_counter() - started
    options = AsrOptions(word_timestamps=asr.supports_word_timestamps, beam_size=1)
    asr.transcribe(audios[:1], [options])  # warm-up

    started = time.perf_counter()
    single = [asr.transcribe([a], [options])[0] for a in audios]
    batch1_s = time.perf_counter() - started
    started = time.perf_counter()
    batched = asr.transcribe(audios, [options] * len(audios))
    batch8_s = time.perf_counter() - started

    def wers(transcripts):
        errors = {name: wer(references[name], t.text) for name, t in zip(CLIPS, transcripts)}
        return {
            "beckett": errors["beckett"],
            "sample": errors["sample"],
            "espeak_mean": float(np.mean([errors[n] for n in ESPEAK])),
        }

    return {
        "engine": engine_name,
        "load_s": load_s,
        "audio_s": audio_s,
        "batch1_s": batch1_s,
        "batch8_s": batch8_s,
        "rtf_batch1": batch1_s / audio_s,
        "rtf_batch8": batch8_s / audio_s,
        "wer_batch1": wers(single),
        "wer_batch8": wers(batched),
        "words_timed": asr.supports_word_timestamps,
        "languages": sorted({t.language for t in batched}),
    }


def run(engine_name: str) -> dict:
    python = sys.executable
    if engine_name == "vllm":
        python = subprocess.run(
            ["bash", str(ROOT / "scripts" / "vllm-env.sh")], check=True, capture_output=True, text=True
        ).stdout.strip().splitlines()[-1]
    out = subprocess.run(
        [python, __file__, "--one", engine_name], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{engine_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="ctranslate2,ctranslate2-fp32,transformers,vllm")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    rows = [run(name) for name in args.engines.split(",")]
    print(f"clips: {', '.join(CLIPS)} ({rows[0]['audio_s']:.1f} s of audio), greedy, language detected")
    print("| engine | load s | batch 1 s | RTF b1 | batch 8 s | RTF b8 | WER beckett | WER sample | WER espeak | word times |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = r["wer_batch8"]
        print(
            f"| {r['engine']} | {r['load_s']:.1f} | {r['batch1_s']:.2f} | {r['rtf_batch1']:.3f} | {r['batch8_s']:.2f} "
            f"| {r['rtf_batch8']:.3f} | {w['beckett']:.3f} | {w['sample']:.3f} | {w['espeak_mean']:.3f} "
            f"| {'yes' if r['words_timed'] else 'no'} |"
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
