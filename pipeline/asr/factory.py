"""The engine the settings name (``HARK_ASR__ENGINE``), with its model loaded and warmed up."""

from __future__ import annotations

from pipeline.asr.base import AsrEngine
from pipeline.asr.warmup import EngineStartError, start_error, warm_up
from pipeline.core.settings import AsrSettings


def build_engine(settings: AsrSettings, *, gpu_share: float | None = None) -> AsrEngine:
    """The engine the settings name, with its model loaded and one warm-up decode run, so that a
    setup that cannot decode (a missing CUDA library, a model too large for the GPU) fails here
    with an ``EngineStartError`` saying what to do, not at the first request.

    ``gpu_share``: the fraction of one GPU the caller was given (a Serve replica's or a Ray Data
    actor's ``num_gpus``); engines that size their memory size it to that share. None: the
    whole device.
    """
    describe = f"The {settings.engine} engine ({settings.model} on {settings.device})"
    try:
        engine = _load(settings, gpu_share)
    except EngineStartError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with advice where the cause is known
        raise start_error(f"{describe} could not load", exc) from exc
    try:
        warm_up(engine, describe)
    except EngineStartError:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:  # a vLLM engine core holds its memory until it is shut down
            shutdown()
        raise
    return engine


def _load(settings: AsrSettings, gpu_share: float | None) -> AsrEngine:
    if settings.engine == "ctranslate2":
        if settings.device in ("cuda", "auto"):
            from pipeline.asr.cuda_libs import preload_cublas

            preload_cublas()  # before CTranslate2 opens libcublas.so.12 by name
        from pipeline.asr.ctranslate2 import CTranslate2Engine

        return CTranslate2Engine.from_settings(settings)
    if settings.engine == "transformers":
        from pipeline.asr.transformers import TransformersEngine

        return TransformersEngine.from_settings(settings, gpu_share=gpu_share)
    if settings.engine == "vllm":
        from pipeline.asr.vllm import VllmEngine

        return VllmEngine.from_settings(settings, gpu_share=gpu_share)
    raise ValueError(f"Unknown ASR engine: {settings.engine!r}")
