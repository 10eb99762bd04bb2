"""The bundled diarization backends on pyannote's sample and a synthetic 3-voice conversation.

Prints, per backend (default = segmentation-3.0 + Resemblyzer clustering; embedding = Silero VAD
+ Resemblyzer windows alone): DER at collar 0 and 0.25 s, speakers found unaided, word-speaker
accuracy against the sample's STM (words from the bundled ASR), and diarization time as a
fraction of ASR time on the same audio (in-process, same threads).

Usage: python bench/diarization_eval.py      (run on an idle machine)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import assets  # noqa: E402
import conversation  # noqa: E402
from pipeline.audio.decode import decode  # noqa: E402
from pipeline.diarization.base import DiarizationOptions
from pipeline.diarization.factory import build_diarizer  # noqa: E402
from pipeline.asr.factory import build_engine  # noqa: E402
from pipeline.transcription.merge import assign_word_speakers  # noqa: E402
from pipeline.tools.scoring import der, read_rttm, word_speaker_accuracy  # noqa: E402
from pipeline.core.settings import AsrSettings, DiarizationSettings  # noqa: E402
from pipeline.core.types import AsrOptions  # noqa: E402


def main() -> None:
    clips = assets.prepare()
    sample = decode(clips["sample"].path, max_duration_s=7200)
    sample_ref = read_rttm(assets.CACHE / "pyannote/audio/sample/sample.rttm")
    conv_audio, conv_ref = conversation.build()
    engine = build_engine(AsrSettings())
    engine.transcribe([sample], [AsrOptions(word_timestamps=True)])  # warm-up
    timings = {}
    for name, audio in (("sample", sample), ("conversation", conv_audio)):
        t = time.perf_counter()
        [transcript] = engine.transcribe([audio], [AsrOptions(word_timestamps=True)])
        timings[name] = (time.perf_counter() - t, transcript)
    for backend in ("default", "embedding"):
        diarizer = build_diarizer(DiarizationSettings(backend=backend))
        diarizer.diarize(sample, DiarizationOptions())  # warm-up
        row = [f"{backend:9}"]
        for name, audio, ref in (("sample", sample, sample_ref), ("conversation", conv_audio, conv_ref)):
            t = time.perf_counter()
            result = diarizer.diarize(audio, DiarizationOptions())
            elapsed = time.perf_counter() - t
            asr_s, transcript = timings[name]
            cell = (
                f"{name}: DER {der(ref, result.turns, 0.0):5.1%} / {der(ref, result.turns, 0.25):5.1%} "
                f"spk {len(result.speakers)} time {elapsed:.2f}s = {elapsed / asr_s:.0%} of ASR"
            )
            if name == "sample":
                labels = assign_word_speakers(transcript.words, result.turns)
                accuracy = word_speaker_accuracy(transcript.words, labels, assets.CACHE / "pyannote/audio/sample/sample.stm")
                cell += f" words {accuracy:.1%}"
            row.append(cell)
        print(" | ".join(row))


if __name__ == "__main__":
    main()
