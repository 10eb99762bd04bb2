"""The CTranslate2 engine's VAD pass, in blocks (review finding 16). Its own file: tests/test_engine.py
also runs inside the vLLM environment, where only the vLLM engine is under test."""

import numpy as np
import pytest

from pipeline.asr.factory import build_engine
from pipeline.audio.decode import decode
from pipeline.core.settings import AsrSettings
from pipeline.core.types import AsrOptions, Audio
from textnorm import wer


def load(clip):
    return decode(clip.path, max_duration_s=7200)


def test_ctranslate2_vad_runs_in_blocks_with_the_same_result(clips, monkeypatch):
    """Review finding 16: faster-whisper's own VAD pass copied the whole audio twice (~1 GB for
    2 h). The engine runs Silero over blocks; a block border inside speech changes nothing."""
    import tracemalloc

    from pipeline.asr import ctranslate2

    engine = build_engine(AsrSettings(engine="ctranslate2"))
    beckett = load(clips["beckett"])
    gap = np.zeros(16000 * 7, dtype=np.float32)
    audio = Audio(np.concatenate([beckett.samples, gap, beckett.samples]))
    options = AsrOptions(language="en", word_timestamps=True)
    [whole] = engine.transcribe([audio], [options])
    monkeypatch.setattr(ctranslate2, "VAD_BLOCK_S", 4)  # borders inside both clips and the gap
    [blocked] = engine.transcribe([audio], [options])
    # The same words (punctuation may differ: a border inside speech changes the decoded chunks).
    assert wer(whole.text, blocked.text) == 0, (whole.text, blocked.text)
    assert len(blocked.words) == len(whole.words)
    # Silero sees a little less context at a border, so a speech region's edge can move by up to its
    # padding (speech_pad_ms, 400 ms), and Whisper's times in the joined speech with it (0.29 s seen
    # on one CPU, < 0.2 s on another); a word never lands in another piece (it did by 7.9 s when a
    # word was mapped by its start instead of its middle).
    assert [w.start for w in blocked.words] == pytest.approx([w.start for w in whole.words], abs=0.4)
    # 20 min of silence: the VAD pass holds about one block's copies, not two of the whole audio.
    monkeypatch.setattr(ctranslate2, "VAD_BLOCK_S", 60)
    silence = Audio(np.zeros(16000 * 1200, dtype=np.float32))
    tracemalloc.start()
    try:
        [t] = engine.transcribe([silence], [AsrOptions(language="en")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t.text == "" and peak < 0.25 * silence.samples.nbytes, peak
