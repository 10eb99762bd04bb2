"""A warm-up decode runs when an engine starts, so a setup that loads but cannot decode (CTranslate2
on CUDA without cuBLAS 12, a model too large for its GPU share) fails at start with a clear
message instead of answering /ready 200 and failing the first request."""

import logging

import numpy as np
import pytest

from pipeline.asr.ctranslate2 import CTranslate2Engine
from pipeline.asr.factory import build_engine
from pipeline.asr.scheduler import WindowResult
from pipeline.asr.warmup import EngineStartError, hint, warm_up
from pipeline.core.settings import AsrSettings, Settings

CUBLAS = "Library libcublas.so.12 is not found or cannot be loaded"  # CTranslate2's own words


class BrokenAtFirstDecode:
    """A WindowEngine that loads but fails its first decode, as CTranslate2 does on CUDA when
    libcublas.so.12 is missing (it opens the library at the first matrix product)."""

    supports_word_timestamps = True
    supports_language_detection = True
    languages = frozenset({"en"})
    speech_windows = True

    def __init__(self):
        self.decoded = []

    def check(self, options):
        pass

    def cut(self, audio, speech_from=None):
        return [((0, len(audio.samples)),)]

    def decode(self, tasks):
        self.decoded.append(tasks)
        raise RuntimeError(CUBLAS)


def test_the_real_bundled_model_warms_up_when_built(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.asr.warmup"):
        engine = build_engine(AsrSettings(engine="ctranslate2", model="whisper-tiny.en"))
    assert isinstance(engine, CTranslate2Engine)
    [line] = [r.getMessage() for r in caplog.records if "warm-up decode took" in r.getMessage()]
    assert "ctranslate2 engine (whisper-tiny.en on cpu)" in line
    # The warm-up is a real decode of the real model: run again, it answers one window.
    assert warm_up(engine, "again") > 0


def test_a_warm_up_that_fails_says_what_to_install():
    broken = BrokenAtFirstDecode()
    with pytest.raises(EngineStartError) as info:
        warm_up(broken, "The ctranslate2 engine (large-v3 on cuda)")
    message = str(info.value)
    assert message.startswith("The ctranslate2 engine (large-v3 on cuda) failed its warm-up decode at start")
    assert CUBLAS in message and "pip install 'hark-asr[cuda]'" in message
    [[task]] = broken.decoded  # one window, language left to detect, a few tokens at most
    assert task.language is None and task.options.max_new_tokens and len(task.samples) == 32000
    assert np.isfinite(task.samples).all()


def test_the_asr_replica_fails_to_start_when_the_warm_up_fails(monkeypatch):
    """The replica's constructor builds the engine, so Serve never marks it running (/ready stays
    503) and `hark serve` exits with this message (tests/test_install.py covers that path)."""
    from deployments.asr import AsrDeployment

    monkeypatch.setattr(CTranslate2Engine, "from_settings", classmethod(lambda cls, settings: BrokenAtFirstDecode()))
    with pytest.raises(EngineStartError, match="failed its warm-up decode at start.*libcublas.so.12.*hark-asr\\[cuda\\]"):
        AsrDeployment.func_or_class(Settings(asr=AsrSettings(device="cuda", compute_type="float16")))


def test_a_load_failure_is_reported_with_its_cause():
    with pytest.raises(EngineStartError, match="could not load: .*no_such_type"):
        build_engine(AsrSettings(model="whisper-tiny.en", compute_type="no_such_type"))


@pytest.mark.parametrize("error, advice", [
    (RuntimeError("CUDA failed with error out of memory"), "share of the GPU"),
    (ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`"), "share of the GPU"),
    (RuntimeError("CUDA driver version is insufficient for CUDA runtime version"), "nvidia-smi"),
    (RuntimeError("Unable to open file 'model.bin'"), None),
])
def test_known_gpu_problems_get_advice(error, advice):
    found = hint(error)
    assert (found is None) if advice is None else (advice in found)


def test_a_warm_up_result_of_the_wrong_shape_fails():
    class Short(BrokenAtFirstDecode):
        def decode(self, tasks):
            return [WindowResult((), "en", 1.0)] * 2

    with pytest.raises(EngineStartError, match="answered 2 windows for 1"):
        warm_up(Short(), "short")
