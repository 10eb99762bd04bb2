"""Word timing's dynamic time warping, vectorised (pipeline.asr.dtw): the same path as transformers'
own pure-Python loop, at least 20× faster, and run only when a request asks for word times."""

import time

import numpy as np
import pytest
from transformers.models.whisper.generation_whisper import _dynamic_time_warping

import pipeline.asr.transformers as hf_engine
from pipeline.asr.dtw import dtw
from pipeline.asr.factory import build_engine
from pipeline.asr.sizing import torch_memory_fraction
from pipeline.audio.decode import decode
from pipeline.core.settings import AsrSettings
from pipeline.core.types import AsrOptions
from textnorm import wer


def alignment_like(rng, tokens, frames):
    """What the engine warps: minus normalised attention, strongest near a monotonic path."""
    centre = np.sort(rng.uniform(0, frames, tokens))[:, None]
    attention = np.exp(-((np.arange(frames)[None, :] - centre) ** 2) / (2 * (frames / tokens) ** 2))
    return -(attention + rng.normal(0, 0.3, (tokens, frames)))


@pytest.mark.parametrize("tokens, frames", [(1, 1), (1, 40), (40, 1), (3, 3), (7, 5), (12, 300), (60, 1500)])
def test_the_path_is_transformers_path(tokens, frames):
    rng = np.random.default_rng(tokens * 1000 + frames)
    matrices = [rng.normal(size=(tokens, frames)), alignment_like(rng, tokens, frames)]
    if tokens * frames <= 3600:
        # Exact ties, where its order of preference decides (on large ones float32 and float64
        # sums break near-ties differently; attention never ties exactly).
        matrices.append(np.round(rng.normal(size=(tokens, frames)), 1))
    for matrix in matrices:
        expected_text, expected_time = _dynamic_time_warping(matrix)
        text, time_ = dtw(matrix)
        np.testing.assert_array_equal(text, expected_text)
        np.testing.assert_array_equal(time_, expected_time)


def test_at_least_20_times_faster_than_transformers():
    matrix = alignment_like(np.random.default_rng(0), 100, 1500)  # ~100 tokens of a full 30 s window
    started = time.perf_counter()
    _dynamic_time_warping(matrix)
    theirs = time.perf_counter() - started
    ours = min(_timed(dtw, matrix) for _ in range(3))
    assert theirs / ours >= 20, f"transformers {theirs * 1000:.0f} ms, ours {ours * 1000:.1f} ms"


def _timed(fn, *args):
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def test_the_transformers_engine_warps_only_when_word_times_are_asked(monkeypatch, clips):
    engine = build_engine(AsrSettings(engine="transformers", model="whisper-tiny.en"))
    calls = []

    def counted(matrix):
        calls.append(matrix)
        return dtw(matrix)

    monkeypatch.setattr(hf_engine, "dtw", counted)
    fox = decode(clips["fox"].path, max_duration_s=60)
    [plain] = engine.transcribe([fox], [AsrOptions(language="en", beam_size=1)])
    assert calls == [] and plain.words == ()
    assert wer(clips["fox"].text, plain.text) < 0.5  # tiny.en, greedy: the point is the timing below
    [timed] = engine.transcribe([fox], [AsrOptions(language="en", beam_size=1, word_timestamps=True)])
    assert len(calls) == 1 and timed.text == plain.text
    # On the model's real alignment matrix too, the path is transformers' own.
    for got, expected in zip(dtw(calls[0]), _dynamic_time_warping(calls[0]), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert timed.words and all(0 <= w.start <= w.end <= fox.duration_s for w in timed.words)


def test_greedy_by_default_on_gpus_beams_where_set():
    assert hf_engine.default_beams(AsrSettings(), "cuda") == 1
    assert hf_engine.default_beams(AsrSettings(), "cpu") == 5
    assert hf_engine.default_beams(AsrSettings(beam_size=5), "cuda") == 5  # set: honoured
    assert hf_engine.default_beams(AsrSettings(beam_size=2), "cpu") == 2


def test_the_memory_cap_is_the_replicas_share():
    assert torch_memory_fraction(None) is None and torch_memory_fraction(1) is None  # a whole card
    assert torch_memory_fraction(0.8) == 0.68 and torch_memory_fraction(0.5) == 0.425
