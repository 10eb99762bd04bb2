import numpy as np
import pytest

from media import ENCODINGS, encode, long_silent_wav, png_bytes, video_only_mp4, wav_bytes
from pipeline.audio.decode import decode, sniff_format
from pipeline.core.errors import AudioTooLong, InvalidAudio, UnsupportedFormat
from pipeline.core.types import SAMPLE_RATE


@pytest.fixture(scope="module")
def beckett(clips):
    return decode(clips["beckett"].path, max_duration_s=7200)


def test_wav_decodes_to_16k_mono_float32(beckett):
    assert beckett.samples.dtype == np.float32 and beckett.samples.ndim == 1
    assert beckett.source_format == "wav"
    assert beckett.duration_s == pytest.approx(9.963, abs=0.01)
    assert np.abs(beckett.samples).max() <= 1.0


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_format_recognised_by_content_and_decoded(beckett, encoding):
    data = encode(beckett.samples, encoding)
    expected = encoding.split("-")[0]
    assert sniff_format(data[:16384]) == expected
    audio = decode(data, max_duration_s=7200)
    assert audio.source_format == expected
    # Lossy codecs pad a little; the duration is the same within 60 ms.
    assert audio.duration_s == pytest.approx(beckett.duration_s, abs=0.06)
    # The speech survived: energy is in the same place as in the original.
    n = min(len(audio.samples), len(beckett.samples))
    envelope = lambda x: np.abs(x[: n - n % 4000]).reshape(-1, 4000).mean(axis=1)  # noqa: E731
    assert np.corrcoef(envelope(audio.samples), envelope(beckett.samples))[0, 1] > 0.9


def test_stereo_44k_is_downmixed_and_resampled():
    t = np.arange(44100 * 2) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, -left]).T.reshape(-1)  # opposite phases cancel in a true downmix
    import io, av  # noqa: E401

    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=44100, layout="stereo")
        frame = av.AudioFrame.from_ndarray((stereo * 32767).astype("<i2")[None, :], format="s16", layout="stereo")
        frame.sample_rate = 44100
        for p in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(p)
    audio = decode(buf.getvalue(), max_duration_s=60)
    assert audio.duration_s == pytest.approx(2.0, abs=0.01)
    assert len(audio.samples) == pytest.approx(2 * SAMPLE_RATE, abs=20)
    assert np.abs(audio.samples).max() < 0.01


def test_name_does_not_matter_content_does(beckett, tmp_path):
    path = tmp_path / "really-an-mp3.wav"
    path.write_bytes(encode(beckett.samples, "mp3"))
    assert decode(path, max_duration_s=60).source_format == "mp3"


@pytest.mark.parametrize(
    "data",
    [b"hello, this is plain text and not audio at all", b"%PDF-1.4\n" + b"x" * 100, b"\x00" * 1000],
    ids=["text", "pdf", "zeros"],
)
def test_unsupported_content(data):
    with pytest.raises(UnsupportedFormat) as info:
        decode(data, max_duration_s=60)
    assert info.value.to_body()["supported_formats"] == ["wav", "mp3", "flac", "ogg", "m4a"]


def test_png_and_video_only_are_unsupported():
    with pytest.raises(UnsupportedFormat):
        decode(png_bytes(), max_duration_s=60)
    with pytest.raises(UnsupportedFormat, match="video"):
        decode(video_only_mp4(), max_duration_s=60)


def test_empty_corrupt_and_silent_containers_are_invalid(beckett):
    with pytest.raises(InvalidAudio, match="empty"):
        decode(b"", max_duration_s=60)
    with pytest.raises(InvalidAudio):
        decode(wav_bytes(np.zeros(0, dtype=np.float32)), max_duration_s=60)
    with pytest.raises(InvalidAudio):
        decode(b"OggS" + b"\x00" * 200 + b"garbage" * 50, max_duration_s=60)
    flac = encode(beckett.samples, "flac")
    with pytest.raises(InvalidAudio):
        decode(flac[:4] + bytes(64) + flac[68:200], max_duration_s=60)


def test_duration_limit_from_header_and_from_samples(beckett):
    with pytest.raises(AudioTooLong) as info:
        decode(long_silent_wav(7201), max_duration_s=7200)
    assert info.value.to_body()["max_duration_s"] == 7200
    # A header can lie or be absent (a stream): the decoded sample count decides too.
    with pytest.raises(AudioTooLong):
        decode(encode(beckett.samples, "ogg-opus"), max_duration_s=5)
    assert decode(long_silent_wav(60), max_duration_s=60).duration_s == pytest.approx(60)


def test_mp3_with_id3_tag_and_bare_frames_are_sniffed(beckett):
    mp3 = encode(beckett.samples, "mp3")
    assert sniff_format(mp3[:64]) == "mp3"
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10
    assert sniff_format(tag + b"fLaC") == "flac"
    assert sniff_format(b"\xff\xfb\x90\x64" + b"\x00" * 60) == "mp3"
    assert sniff_format(b"\xff\xf1\x50\x80" + b"\x00" * 60) is None  # ADTS AAC is not MP3
