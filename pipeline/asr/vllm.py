"""Whisper through vLLM: every window of every request in a batch is in flight at once, and vLLM's
scheduler batches them (continuous batching, paged KV cache).

Prompts are Whisper's encoder/decoder pair: the audio window as the encoder's multi-modal input,
``<|startoftranscript|><|xx|><|transcribe|><|notimestamps|>`` (after ``<|startofprev|>`` text when
a prompt is given) as the decoder's token ids. Language detection is one constrained token over
the language tokens. Offsets come from the real window bounds (``pipeline.asr.chunking``).

What vLLM cannot do, this engine declares instead of faking:
- word timestamps: offline generation exposes no cross-attention, so words cannot be timed;
  ``supports_word_timestamps`` is False and the service refuses ``timestamps``/``diarize``
  with ``INVALID_PARAMETER`` (segment times, from the windows, stay exact);
- beam search: vLLM offers it only through a separate API (``LLM.beam_search``), not wired (or
  tried) here for encoder/decoder multi-modal prompts, so decoding is greedy (temperature
  fallback included) whatever ``beam_size`` says.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.asr.windowed import Decoded, WhisperTokens, Window, WindowedEngine, resolve_device, resolve_dtype
from pipeline.asr.models import model_file
from pipeline.asr.convert import resolve_transformers_model
from pipeline.core.settings import AsrSettings
from pipeline.core.types import SAMPLE_RATE

_LANGUAGE_LOGPROBS = 10


class VllmEngine(WindowedEngine):
    supports_word_timestamps = False
    supports_beam_search = False

    def __init__(self, llm: Any, tokens: WhisperTokens, settings: AsrSettings) -> None:
        super().__init__(tokens, settings)
        self._llm = llm
        self._max_len = int(llm.llm_engine.model_config.max_model_len)

    @classmethod
    def from_settings(cls, settings: AsrSettings, *, gpu_share: float | None = None) -> "VllmEngine":
        from vllm import LLM

        path = resolve_transformers_model(settings.model, settings.model_cache_dir)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        options: dict[str, Any] = dict(
            model=path,
            max_model_len=448,  # Whisper's decoder context
            limit_mm_per_prompt={"audio": 1},
            dtype=dtype,
            max_num_seqs=settings.vllm_max_num_seqs,
            download_dir=str(settings.model_cache_dir),
            # CUDA graphs on GPUs; the CPU backend runs eagerly.
            enforce_eager=device != "cuda",
        )
        default_share = 0.85 if device == "cuda" else 0.2
        options["gpu_memory_utilization"] = settings.vllm_memory_utilization or default_share
        if device != "cuda":
            # On the CPU the engine core runs in this process: a spawned core process would need
            # an importable __main__ (scripts, notebooks) and competes for the same cores anyway.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if settings.cpu_threads:
                os.environ.setdefault("OMP_NUM_THREADS", str(settings.cpu_threads))
        llm = LLM(**options)
        vocab_size = llm.llm_engine.model_config.hf_config.vocab_size
        tokens = WhisperTokens(model_file(path, "tokenizer.json", settings.model_cache_dir), vocab_size)
        return cls(llm, tokens, settings)

    @staticmethod
    def _prompt(samples: np.ndarray, decoder_ids: Sequence[int]) -> dict:
        return {
            "encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (samples, SAMPLE_RATE)}},
            "decoder_prompt": {"prompt_token_ids": list(decoder_ids)},
        }

    def _detect(self, first_windows: list[np.ndarray]) -> list[tuple[str, float]]:
        from vllm import SamplingParams

        by_id = {i: code for code, i in self._tokens.language_ids.items()}
        params = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            allowed_token_ids=list(by_id),
            logprobs=_LANGUAGE_LOGPROBS,
        )
        outputs = self._llm.generate(
            [self._prompt(w, [self._tokens.sot]) for w in first_windows], params, use_tqdm=False
        )
        found = []
        for out in outputs:
            completion = out.outputs[0]
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

        prompts, params = [], []
        for w in windows:
            room = self._max_len - len(w.prompt) - 1
            prompts.append(self._prompt(w.samples, w.prompt))
            params.append(
                SamplingParams(
                    temperature=temperature,
                    max_tokens=min(w.options.max_new_tokens or room, room),
                    logprobs=0,  # the chosen token's own log-probability
                    skip_special_tokens=False,
                )
            )
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        decoded = []
        for out in outputs:
            completion = out.outputs[0]
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
