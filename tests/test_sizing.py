"""Engine limits from the replica's GPU share (pipeline.asr.sizing): Ray's num_gpus is bookkeeping
only, so each engine must size itself to its share."""

import pytest

from pipeline.asr.sizing import WINDOW_ENCODER_TOKENS, gpu_fraction, vllm_sizing
from pipeline.core.settings import AsrSettings


def test_two_vllm_engines_on_half_a_card_each_fit_together():
    """Regression: `hark batch --gpus-per-actor 0.5` started two engines that each asked for 0.85
    of the card; the second failed its free-memory check."""
    halves = [vllm_sizing(AsrSettings(), "cuda", 0.5) for _ in range(2)]
    assert [h.memory_utilization for h in halves] == [0.425, 0.425]
    assert sum(h.memory_utilization for h in halves) <= 0.85


@pytest.mark.parametrize("share, memory, seqs, windows_per_step", [
    (None, 0.85, 128, 8),  # a process of its own: the whole card
    (1.0, 0.85, 128, 8),
    (0.8, 0.68, 102, 6),  # the GPU profile: ASR 0.8, diarization 0.2
    (0.5, 0.425, 64, 4),
    (0.1, 0.085, 12, 2),  # never below two windows' encoders a step
])
def test_vllm_limits_follow_the_gpu_share(share, memory, seqs, windows_per_step):
    sizing = vllm_sizing(AsrSettings(), "cuda", share)
    assert sizing.memory_utilization == memory and sizing.max_num_seqs == seqs
    assert sizing.max_num_batched_tokens == windows_per_step * WINDOW_ENCODER_TOKENS


def test_settings_win_over_the_derived_limits():
    settings = AsrSettings(vllm_memory_utilization=0.3, vllm_max_num_seqs=40, vllm_max_num_batched_tokens=4500)
    sizing = vllm_sizing(settings, "cuda", 0.5)
    assert (sizing.memory_utilization, sizing.max_num_seqs, sizing.max_num_batched_tokens) == (0.3, 40, 4500)


def test_cpu_defaults_and_bounds():
    cpu = vllm_sizing(AsrSettings(), "cpu", None)
    assert (cpu.memory_utilization, cpu.max_num_seqs, cpu.max_num_batched_tokens) == (0.2, 16, 3000)
    with pytest.raises(ValueError):  # less than one window's encoder could never schedule a window
        AsrSettings(vllm_max_num_batched_tokens=1000)
    assert gpu_fraction(2.0) == 1.0 and gpu_fraction(0) == 1.0 and gpu_fraction(0.25) == 0.25
