"""ASR deployment: holds one engine and the window scheduler that feeds it.

Requests arrive on the replica's event loop and are queued as windows (``WindowScheduler``); one
worker thread decodes the next batch of windows from all requests in flight, so a request that
joins while a batch runs goes into the next step, and each is answered when its own last window
is done. An engine that schedules windows itself (vLLM: ``transcribe_async``) takes each request
directly instead; its ``check_health`` is the replica's health check, and the replica shuts it
down when it stops.
"""

from __future__ import annotations

import asyncio

from ray import serve

from deployments import adopt_serve_logging, replica_info, yield_cpu_to_the_front
from pipeline.asr.scheduler import InterimSkipped, Replaced
from pipeline.core.settings import Settings
from pipeline.core.types import AsrOptions, Audio, Transcript


@serve.deployment(
    name="ASR",
    max_ongoing_requests=32,
    max_queued_requests=64,
    graceful_shutdown_timeout_s=900,
    ray_actor_options={"num_cpus": 1},
)
class AsrDeployment:
    def __init__(self, settings: Settings) -> None:
        from deployments.metrics import AsrMetrics
        from pipeline.asr.factory import build_engine
        from pipeline.asr.scheduler import WindowScheduler, step_audio_s, window_engine

        adopt_serve_logging()
        self._settings = settings
        yield_cpu_to_the_front(settings)
        self._engine = build_engine(settings.asr, gpu_share=assigned_gpu_share())
        # vLLM batches every request's windows in its own scheduler, step by step.
        self._direct = getattr(self._engine, "transcribe_async", None)
        windows = window_engine(self._engine)
        self._metrics = AsrMetrics(serve.get_replica_context().replica_id.unique_id)
        self._scheduler = WindowScheduler(
            windows,
            # A "window" of an engine that cuts audio itself is a whole request.
            max_batch_windows=(
                settings.asr.window_batch_size if windows is self._engine else settings.asr.max_batch_size
            ),
            max_batch_audio_s=step_audio_s(settings.asr, windows) if windows is self._engine else float("inf"),
            observer=self._metrics,
        )
        # The engine blocks for seconds a step: steps run off the event loop, which keeps taking
        # requests and answering health checks; side by side where the engine runs each on a few
        # threads (CTranslate2 on a CPU), with an express lane for new requests and streams.
        self._workers = self._scheduler.start()

    async def transcribe(self, audio: Audio, options: AsrOptions) -> Transcript | Replaced:
        if self._direct is not None:  # vLLM schedules the windows; a hang-up cancels this call and aborts them
            return await self._direct(audio, options)
        # Cutting (the VAD pass) runs in a thread of its own, beside the decoding steps.
        future = await asyncio.to_thread(
            self._scheduler.submit, audio, options, stream=options.stream, interim=options.interim
        )
        try:
            return await asyncio.wrap_future(future)
        except InterimSkipped as skipped:  # newer audio of the stream won: an answer, not a fault
            return Replaced(str(skipped))
        except asyncio.CancelledError:  # the caller hung up: its windows not yet started are dropped
            self._scheduler.cancel(future)
            raise

    async def check_health(self) -> None:
        """Serve's health check: a dead engine (vLLM's engine core) fails it, and Serve replaces
        the replica."""
        check = getattr(self._engine, "check_health", None)
        if check is not None:
            await asyncio.to_thread(check)

    def capabilities(self):
        from pipeline.asr.base import Capabilities

        return Capabilities.of(self._engine, self._settings.asr.engine)

    def describe(self) -> dict:
        return replica_info(self._settings, languages=sorted(self._engine.languages))

    def metrics_text(self) -> bytes:
        return self._metrics.render()

    def __del__(self) -> None:
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.close()
        shutdown = getattr(getattr(self, "_engine", None), "shutdown", None)
        if shutdown is not None:  # a vLLM engine core would hold its GPU memory past the replica
            shutdown()


def assigned_gpu_share() -> float | None:
    """This actor's ``num_gpus`` (a Serve replica's, a Ray Data actor's); None when it has none."""
    import ray

    if not ray.is_initialized():  # not in a Ray worker (the engine built in a plain process)
        return None
    try:
        share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    except AssertionError:  # a Ray driver, not a worker: nothing was assigned to it
        return None
    return float(share) if share else None
