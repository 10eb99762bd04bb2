"""One real decode when an engine starts, so that a broken setup fails at start, not on the first
request.

Loading a model proves little on a GPU: CTranslate2 opens ``libcublas.so.12`` only at the first
matrix product, vLLM and transformers allocate their working memory at the first batch. The
factory runs ``warm_up`` on every engine it builds; an ASR replica is not ready (``/ready``) until
its constructor, and so the warm-up, returned. A failure is an ``EngineStartError`` that says
what to install or change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from pipeline.asr.scheduler import WindowEngine, WindowTask
from pipeline.core.types import SAMPLE_RATE, AsrOptions

logger = logging.getLogger(__name__)

WARM_UP_S = 2.0  # audio decoded: enough for the encoder and a few decoder steps
WARM_UP_TOKENS = 8  # decoder steps at most: the warm-up proves the kernels run, not the text

# (what an error message holds, lower case) → what to do about it.
_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("libcublas", "libcudnn", "cublas", "cudnn"),
     "CTranslate2 4.x on CUDA needs the CUDA 12 cuBLAS library: "
     "pip install 'hark-asr[cuda]' (nvidia-cublas-cu12), see cluster/README.md"),
    (("out of memory", "outofmemory", "no available memory for the cache blocks"),
     "the model does not fit in this replica's share of the GPU: a smaller model, a larger "
     "num_gpus for ASR, or lower HARK_ASR__WINDOW_BATCH_SIZE / HARK_ASR__VLLM_MAX_NUM_SEQS"),
    (("driver version is insufficient", "cuda driver", "no cuda gpus", "no cuda-capable device"),
     "no usable CUDA device: check `nvidia-smi` and the driver version cluster/README.md names, "
     "or run with HARK_ASR__DEVICE=cpu"),
)


class EngineStartError(RuntimeError):
    """An engine that loaded but cannot decode (or could not load), with what to do about it."""


def hint(error: BaseException) -> str | None:
    """What to do about ``error``, when it is a known GPU setup problem."""
    text = f"{type(error).__name__}: {error}".lower()
    for needles, advice in _HINTS:
        if any(n in text for n in needles):
            return advice
    return None


def start_error(what: str, error: BaseException) -> EngineStartError:
    advice = hint(error)
    return EngineStartError(f"{what}: {type(error).__name__}: {error}" + (f". Fix: {advice}" if advice else ""))


def warm_up_audio() -> np.ndarray:
    """(n,) float32: quiet noise. Its text does not matter; that it decodes does."""
    return np.random.default_rng(0).normal(0.0, 0.01, int(WARM_UP_S * SAMPLE_RATE)).astype(np.float32)


def warm_up(engine: object, describe: str) -> float:
    """Run one short decode (language detection included) on ``engine``; the seconds it took.

    ``describe`` names the engine, model and device in the error. Engines with a ``warm_up()``
    method of their own (the transformers and vLLM engines) run that; a ``WindowEngine``
    (CTranslate2) decodes one window directly, past the VAD that would drop the noise.
    """
    started = time.monotonic()
    try:
        own: Callable[[], object] | None = getattr(engine, "warm_up", None)
        if own is not None:
            own()
        elif isinstance(engine, WindowEngine):
            samples = warm_up_audio()
            task = WindowTask(
                samples=samples,
                start=0,
                options=AsrOptions(max_new_tokens=WARM_UP_TOKENS, beam_size=1, temperature_fallback=False),
                language=None,  # detection runs too
                duration_s=WARM_UP_S,
                pieces=((0, len(samples)),),
            )
            results = engine.decode([task])
            if len(results) != 1:
                raise RuntimeError(f"the engine answered {len(results)} windows for 1")
        else:
            raise TypeError(f"{type(engine).__name__} has no way to warm up")
    except Exception as exc:  # noqa: BLE001 - every cause is reported, with advice where known
        raise start_error(f"{describe} failed its warm-up decode at start", exc) from exc
    elapsed = time.monotonic() - started
    logger.info("%s: warm-up decode took %.2f s", describe, elapsed)
    return elapsed
