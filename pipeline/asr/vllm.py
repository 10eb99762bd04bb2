from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import threading
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from pipeline.asr.convert import resolve_transformers_model
from pipeline.asr.models import model_file
from pipeline.asr.sizing import VllmSizing, vllm_sizing
from pipeline.asr.windowed import Decoded, WhisperTokens, Window, WindowedEngine, resolve_device, resolve_dtype
from pipeline.core.settings import AsrSettings
from pipeline.core.types import SAMPLE_RATE, AsrOptions, Audio, Transcript, as_float32

logger = logging.getLogger(__name__)
T = TypeVar("T")
_LANGUAGE_LOGPROBS = 10
_HEALTH_TIMEOUT_S = 30.0


class EngineLoop:
    """An asyncio loop on a thread of its own: where the ``AsyncLLM`` and its output handler run,
    whatever thread (or other loop) the callers are on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Cancelling the returned future cancels the coroutine's task in the loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return self.submit(coro).result(timeout_s)

    def close(self) -> None:
        """Cancel what still runs in the loop (the engine's output handler), then end it."""
        if self.loop.is_running():
            async def drain() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                self.submit(drain()).result(10)
            except Exception:  # noqa: BLE001 - closing regardless
                logger.warning("The vLLM engine loop did not drain in 10 s", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class _Call:
    """One ``transcribe_async`` call: the engine futures its worker thread waits on, so that
    cancelling the call cancels (and vLLM aborts) every stream it has in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: set[concurrent.futures.Future] = set()
        self.cancelled = False

    def wait(self, future: concurrent.futures.Future[T]) -> T:
        with self._lock:
            if self.cancelled:
                future.cancel()
            self._futures.add(future)
        try:
            return future.result()
        finally:
            with self._lock:
                self._futures.discard(future)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            futures = list(self._futures)
        for f in futures:
            f.cancel()


class VllmEngine(WindowedEngine):
    supports_word_timestamps = False
    supports_beam_search = False

    def __init__(self, llm: Any, loop: EngineLoop, tokens: WhisperTokens, settings: AsrSettings,
                 sizing: VllmSizing) -> None:
        super().__init__(tokens, settings)
        self._llm = llm
        self._loop = loop
        self.sizing = sizing
        self._max_len = int(llm.model_config.max_model_len)
        self._local = threading.local()  # .call: the _Call of transcribe_async on this thread
        # Threads that run one request's steps each (VAD, then waiting on its streams).
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(32, 2 * sizing.max_num_seqs), thread_name_prefix="vllm-request"
        )
        self._closed = False

    @classmethod
    def from_settings(cls, settings: AsrSettings, *, gpu_share: float | None = None) -> "VllmEngine":
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve_transformers_model(settings.model, settings.resolved_model_cache_dir)
        device = resolve_device(settings.device)
        sizing = vllm_sizing(settings, device, gpu_share)
        args = AsyncEngineArgs(
            model=path,
            max_model_len=448,  # Whisper's decoder context
            limit_mm_per_prompt={"audio": 1},
            dtype=resolve_dtype(settings.dtype, device),
            gpu_memory_utilization=sizing.memory_utilization,
            max_num_seqs=sizing.max_num_seqs,
            max_num_batched_tokens=sizing.max_num_batched_tokens,
            # Earlier windows of a request first, across requests (see the module's docstring).
            scheduling_policy="priority",
            download_dir=str(settings.resolved_model_cache_dir),
            # CUDA graphs on GPUs; the CPU backend runs eagerly.
            enforce_eager=device != "cuda",
            disable_log_stats=True,
        )
        if device != "cuda" and settings.cpu_threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(settings.cpu_threads))
        loop = EngineLoop()

        async def start() -> Any:  # in the loop, so that the engine's output handler runs there
            return AsyncLLM.from_engine_args(args)

        try:
            llm = loop.run(start())
        except BaseException:
            loop.close()
            raise
        logger.info("vLLM engine started: %s", sizing)
        vocab_size = llm.model_config.hf_config.vocab_size
        tokens = WhisperTokens(model_file(path, "tokenizer.json", settings.resolved_model_cache_dir), vocab_size)
        return cls(llm, loop, tokens, settings, sizing)

    # --- requests --------------------------------------------------------------------------------
    async def transcribe_async(self, audio: Audio, options: AsrOptions) -> Transcript:
        """One request, its windows decoded beside every other request's. Cancelling this call
        aborts its streams in vLLM."""
        call = _Call()

        def work() -> Transcript:
            self._local.call = call
            try:
                [transcript] = self.transcribe([audio], [options])
                return transcript
            finally:
                self._local.call = None

        future = asyncio.get_running_loop().run_in_executor(self._workers, work)
        try:
            return await future
        except asyncio.CancelledError:
            call.cancel()
            raise

    def unfinished_windows(self) -> int:
        """Windows (and language detections) in the engine now: running or waiting."""
        return int(self._llm.get_num_unfinished_requests())

    def check_health(self) -> None:
        """Raise when the engine core is dead (vLLM's ``EngineDeadError``) or does not answer."""
        if self._closed:
            raise RuntimeError("The vLLM engine was shut down")
        self._loop.run(self._llm.check_health(), _HEALTH_TIMEOUT_S)

    def shutdown(self) -> None:
        """End the engine core (its memory is free afterwards) and the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._workers.shutdown(wait=False, cancel_futures=True)
        try:
            self._llm.shutdown()
        finally:
            self._loop.close()
            # Dropped here, while the interpreter is whole: AsyncLLM.__del__ shuts down again, and
            # at interpreter exit that fails noisily.
            self._llm = None

    # --- the engine's streams --------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` in the engine loop and wait for it (cancellable by this thread's call)."""
        future = self._loop.submit(coro)
        call: _Call | None = getattr(self._local, "call", None)
        return call.wait(future) if call is not None else future.result()

    async def _generate(self, prompt: dict, params: Any, priority: int) -> Any:
        """The final output of one stream with a request id of its own; cancelled, vLLM aborts it."""
        final = None
        async for out in self._llm.generate(prompt, params, request_id=f"hark-{uuid.uuid4().hex}", priority=priority):
            final = out
        return final.outputs[0]

    async def _generate_all(self, jobs: list[tuple[dict, Any, int]]) -> list[Any]:
        # A task group: one stream failing cancels (aborts) the others, none is left running.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._generate(*job)) for job in jobs]
        return [t.result() for t in tasks]

    @staticmethod
    def _prompt(samples: np.ndarray, decoder_ids: Sequence[int]) -> dict:
        return {
            "encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (samples, SAMPLE_RATE)}},
            "decoder_prompt": {"prompt_token_ids": list(decoder_ids)},
        }

    def _detect(self, first_windows: list[np.ndarray]) -> list[tuple[str, float]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        by_id = {i: code for code, i in self._tokens.language_ids.items()}
        params = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            allowed_token_ids=list(by_id),
            logprobs=_LANGUAGE_LOGPROBS,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        completions = self._run(self._generate_all([(self._prompt(w, [self._tokens.sot]), params, 0) for w in first_windows]))
        found = []
        for completion in completions:
            chosen = completion.token_ids[0]
            # vLLM reports raw log-probabilities over the whole vocabulary: renormalise over the
            # language tokens among the top ones.
            top = completion.logprobs[0] if completion.logprobs else {}
            weights = {i: math.exp(lp.logprob) for i, lp in top.items() if i in by_id}
            total = sum(weights.values())
            probability = weights.get(chosen, 0.0) / total if total else 0.0
            found.append((by_id.get(chosen, "en"), float(probability)))
        return found

    def _decode(self, windows: list[Window], temperature: float) -> list[Decoded]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        jobs = []
        rank: dict[int, int] = {}  # windows of each audio so far: the next one's priority
        for w in windows:
            room = self._max_len - len(w.prompt) - 1
            params = SamplingParams(
                temperature=temperature,
                max_tokens=min(w.options.max_new_tokens or room, room),
                logprobs=0,  # the chosen token's own log-probability
                detokenize=False,  # Hark decodes the ids itself (WhisperTokens)
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            priority = rank.get(w.audio_index, 0)
            rank[w.audio_index] = priority + 1
            jobs.append((self._prompt(as_float32(w.samples), w.prompt), params, priority))
        decoded = []
        for completion in self._run(self._generate_all(jobs)):
            ids = list(completion.token_ids)
            text = self._tokens.text_only(ids)
            logprobs = [
                step[token].logprob if step and token in step else 0.0
                for step, token in zip(completion.logprobs or [], ids, strict=False)
            ]
            kept = logprobs[: len(text) + 1]  # the text tokens and the end token
            decoded.append(
                Decoded(
                    tokens=text,
                    probabilities=[math.exp(lp) for lp in logprobs[: len(text)]],
                    times=None,
                    avg_logprob=float(np.sum(kept) / max(1, len(kept))),
                )
            )
        return decoded
