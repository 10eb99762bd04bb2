"""Whisper through transformers: windows of many requests decoded as one padded batch.

Each batch runs the encoder once; the encoder states serve language detection (one decoder step
over the language tokens), decoding (``generate`` with explicit options: transformers' defaults
would pick 5 beams) and word timing. One teacher-forced decoder pass over the decoded text gives
each token's probability; where a window's request asked for word times, the same pass gives
them: cross-attention of the model's alignment heads, normalised and median-filtered, then
dynamic time warping (``pipeline.asr.dtw``, vectorised), as OpenAI's Whisper and faster-whisper
do. float16 on CUDA by default, float32 on the CPU; SDPA attention; greedy decoding on CUDA
unless ``HARK_ASR__BEAM_SIZE`` is set (five beams hold five times the cross-attention K/V); on
a GPU share (``num_gpus`` < 1) torch's allocator is capped to that share.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

import numpy as np
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.generation_whisper import _median_filter

from pipeline.asr.convert import resolve_transformers_model
from pipeline.asr.dtw import dtw
from pipeline.asr.models import model_file
from pipeline.asr.sizing import torch_memory_fraction
from pipeline.asr.windowed import Decoded, WhisperTokens, Window, WindowedEngine, resolve_device, resolve_dtype
from pipeline.core.settings import AsrSettings
from pipeline.core.types import as_float32

_MEDIAN_FILTER_WIDTH = 7
_SECONDS_PER_ENCODER_FRAME = 0.02


class TransformersEngine(WindowedEngine):
    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        features: WhisperFeatureExtractor,
        tokens: WhisperTokens,
        settings: AsrSettings,
    ) -> None:
        super().__init__(tokens, settings)
        self._model = model
        self._features = features
        self._device = model.device
        self._dtype = model.dtype
        heads = getattr(model.generation_config, "alignment_heads", None)
        if not heads:  # no alignment heads known: OpenAI's fallback, every head of the top half
            layers, n_heads = model.config.decoder_layers, model.config.decoder_attention_heads
            heads = [[layer, h] for layer in range(layers // 2, layers) for h in range(n_heads)]
        self._heads = [tuple(h) for h in heads]
        self._lock = threading.Lock()
        self._encoded: dict[tuple[int, int], torch.Tensor] = {}
        self.default_beams = default_beams(settings, self._device.type)

    @classmethod
    def from_settings(cls, settings: AsrSettings, *, gpu_share: float | None = None) -> "TransformersEngine":
        path = resolve_transformers_model(settings.model, settings.resolved_model_cache_dir)
        device = resolve_device(settings.device)
        if device == "cpu":
            torch.set_num_threads(settings.cpu_threads or (os.cpu_count() or 1))
        elif device == "cuda" and (fraction := torch_memory_fraction(gpu_share)) is not None:
            # Ray's num_gpus is bookkeeping: cap this process to its share, so the diarizer (or a
            # second actor) on the same card keeps the rest.
            torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
        model = WhisperForConditionalGeneration.from_pretrained(
            path,
            dtype=getattr(torch, resolve_dtype(settings.dtype, device)),
            attn_implementation="sdpa",
            cache_dir=str(settings.resolved_model_cache_dir),
        )
        model = model.to(device).eval()
        features = WhisperFeatureExtractor.from_pretrained(path, cache_dir=str(settings.resolved_model_cache_dir))
        tokens = WhisperTokens(model_file(path, "tokenizer.json", settings.resolved_model_cache_dir), model.config.vocab_size)
        return cls(model, features, tokens, settings)

    def transcribe(self, batch, options):
        # One call at a time (word timing switches the attention implementation), and encoder
        # states kept from language detection never outlive the call that made them.
        with self._lock:
            try:
                return super().transcribe(batch, options)
            finally:
                self._encoded.clear()

    # --- batches ---------------------------------------------------------------------------------
    def _encode(self, samples: list[np.ndarray]) -> torch.Tensor:
        """Encoder states of each window. A window whose language was just detected is not
        encoded twice: its states are kept from detection (same audio buffer, same span) until
        the end of the ``transcribe`` call."""
        keys = [_span_key(s) for s in samples]
        todo = [i for i, k in enumerate(keys) if k not in self._encoded]
        if len(todo) == len(samples):
            return self._run_encoder(samples)
        fresh = dict(zip(todo, self._run_encoder([samples[i] for i in todo]))) if todo else {}
        return torch.stack([fresh[i] if i in fresh else self._encoded[k] for i, k in enumerate(keys)])

    def _run_encoder(self, samples: list[np.ndarray]) -> torch.Tensor:
        inputs = self._features(
            [s.astype(np.float32) for s in samples],
            sampling_rate=16_000,
            return_tensors="pt",
            device=str(self._device),
        )
        features = inputs.input_features.to(self._device, self._dtype)
        return self._model.model.encoder(features).last_hidden_state

    def _chunks(self, items: list) -> list[list]:
        size = self._settings.window_batch_size
        return [items[i : i + size] for i in range(0, len(items), size)]

    @torch.inference_mode()
    def _detect(self, first_windows: list[np.ndarray]) -> list[tuple[str, float]]:
        codes = list(self._tokens.language_ids)
        ids = torch.tensor([self._tokens.language_ids[c] for c in codes], device=self._device)
        found: list[tuple[str, float]] = []
        for chunk in self._chunks(first_windows):
            encoded = self._run_encoder(chunk)
            self._encoded.update((_span_key(w), state) for w, state in zip(chunk, encoded, strict=True))
            start = torch.full((len(chunk), 1), self._tokens.sot, device=self._device)
            logits = self._model(encoder_outputs=(encoded,), decoder_input_ids=start).logits[:, -1]
            probs = torch.softmax(logits[:, ids].float(), dim=-1)
            best = probs.argmax(dim=-1)
            found += [(codes[int(b)], float(probs[row, b])) for row, b in enumerate(best)]
        return found

    @torch.inference_mode()
    def _decode(self, windows: list[Window], temperature: float) -> list[Decoded]:
        results: list[Decoded | None] = [None] * len(windows)
        # One generate call needs one prompt length and one set of decoding options.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, w in enumerate(windows):
            groups[(len(w.prompt), w.options.beam_size, w.options.max_new_tokens)].append(i)
        for members in groups.values():
            for chunk in self._chunks(members):
                batch = [windows[i] for i in chunk]
                for i, decoded in zip(chunk, self._decode_batch(batch, temperature), strict=True):
                    results[i] = decoded
        return results  # type: ignore[return-value]

    def _decode_batch(self, batch: list[Window], temperature: float) -> list[Decoded]:
        encoded = self._encode([as_float32(w.samples) for w in batch])
        prompts = torch.tensor([list(w.prompt) for w in batch], device=self._device)
        options = batch[0].options
        room = self._model.config.max_target_positions - prompts.shape[1] - 1
        sampling = temperature > 0
        generated = self._model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
            decoder_input_ids=prompts,
            num_beams=1 if sampling else (options.beam_size or self.default_beams),
            do_sample=sampling,
            temperature=temperature if sampling else None,
            max_new_tokens=min(options.max_new_tokens or room, room),
        )
        sequences = generated.sequences if hasattr(generated, "sequences") else generated
        # Whisper's generate returns the prompt in front of the new tokens on some paths only.
        texts = []
        for window, row in zip(batch, sequences.tolist(), strict=True):
            prompt = list(window.prompt)
            texts.append(self._tokens.text_only(row[len(prompt) :] if row[: len(prompt)] == prompt else row))
        return self._align(encoded, batch, texts)

    def _cross_attention(self, layer: int, hidden: torch.Tensor, encoded: torch.Tensor, wanted: list[int]) -> torch.Tensor:
        """softmax(q kᵀ) of one layer's cross-attention, as Whisper computes it, for the heads
        ``wanted`` only (float32 of every head of large-v3's layers would take GBs):
        (batch, len(wanted), tokens, frames)."""
        attention = self._model.model.decoder.layers[layer].encoder_attn
        heads, size = self._model.config.decoder_attention_heads, attention.head_dim
        q = (attention.q_proj(hidden).unflatten(-1, (heads, size))[:, :, wanted].float() * attention.scaling).transpose(1, 2)
        k = attention.k_proj(encoded).unflatten(-1, (heads, size))[:, :, wanted].float().transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1)

    def _align(self, encoded: torch.Tensor, batch: list[Window], texts: list[list[int]]) -> list[Decoded]:
        """Token probabilities, and times where asked for, from one teacher-forced pass over
        prompt + text + <|endoftext|>."""
        eot = self._tokens.eot
        rows = [list(w.prompt) + text + [eot] for w, text in zip(batch, texts, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [eot] * (width - len(r)) for r in rows], device=self._device)
        timed = any(w.options.word_timestamps for w in batch)
        queries: dict[int, torch.Tensor] = {}  # the cross-attention input of each alignment layer
        hooks = [
            self._model.model.decoder.layers[layer].encoder_attn.register_forward_pre_hook(
                lambda module, args, kwargs, layer=layer: queries.__setitem__(
                    layer, kwargs.get("hidden_states", args[0] if args else None)
                ),
                with_kwargs=True,
            )
            for layer in ({layer for layer, _ in self._heads} if timed else ())
        ]
        try:
            hidden = self._model.model.decoder(input_ids=ids, encoder_hidden_states=encoded).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        logprobs = torch.log_softmax(self._model.proj_out(hidden).float(), dim=-1)
        # (batch, heads, tokens, frames) of the alignment heads only, recomputed from their inputs:
        # asking the model for attentions would keep every layer's and force eager attention.
        weights = None
        if timed:
            wanted: dict[int, list[int]] = defaultdict(list)  # alignment heads of each layer
            for layer, head in self._heads:
                wanted[layer].append(head)
            per_layer = {layer: self._cross_attention(layer, queries[layer], encoded, wanted[layer]) for layer in queries}
            weights = torch.stack([per_layer[layer][:, wanted[layer].index(head)] for layer, head in self._heads], dim=1)
        decoded = []
        for b, (window, text) in enumerate(zip(batch, texts, strict=True)):
            first = len(window.prompt) - 1  # the row whose query predicts the first text token
            targets = torch.tensor(text + [eot], device=self._device)
            token_logprobs = logprobs[b, first : first + len(targets)].gather(1, targets[:, None])[:, 0]
            times = None
            if text and weights is not None and window.options.word_timestamps:
                frames = max(1, window.num_frames // 2)
                matrix = weights[b, :, first : first + len(targets), :frames]
                std, mean = torch.std_mean(matrix, dim=-2, keepdim=True, unbiased=False)
                matrix = _median_filter((matrix - mean) / (std + 1e-8), _MEDIAN_FILTER_WIDTH).mean(dim=0)
                text_idx, time_idx = dtw(-matrix.cpu().double().numpy())
                jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
                times = (time_idx[jumps] * _SECONDS_PER_ENCODER_FRAME).tolist()
            values = token_logprobs.cpu().numpy()
            decoded.append(
                Decoded(
                    tokens=text,
                    probabilities=np.exp(values[:-1]).tolist(),
                    times=times,
                    avg_logprob=float(values.sum() / len(values)),
                )
            )
        return decoded


def default_beams(settings: AsrSettings, device: str) -> int:
    """Beams of a request that names none: ``HARK_ASR__BEAM_SIZE`` where set; else greedy on CUDA
    (a batch of 16 windows × 5 beams of large-v3 holds ~20 GB of cross-attention K/V) and the
    setting's default (5, as CTranslate2) elsewhere."""
    if "beam_size" in settings.model_fields_set or device != "cuda":
        return settings.beam_size
    return 1


def _span_key(samples: np.ndarray) -> tuple[int, int]:
    """Identity of a window: where its samples live and how many there are."""
    return samples.__array_interface__["data"][0], len(samples)
