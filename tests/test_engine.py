"""Every ASR engine on the real bundled model and real speech: one contract for all.

Engines under test come from ``HARK_TEST_ENGINES`` (default: ctranslate2,transformers); `.ci/run`
runs this file again with ``vllm`` inside the vLLM environment it builds.
"""

import asyncio
import os

import numpy as np
import pytest

from conftest import wait_until
from pipeline.audio.decode import decode
from pipeline.asr.base import AsrEngine, Capabilities, transcribe_each
from pipeline.asr.factory import build_engine
from pipeline.core.errors import InvalidAudio, InvalidParameter
from pipeline.core.settings import AsrSettings
from pipeline.core.types import AsrOptions, Audio, Transcript
from pipeline.transcription.flow import LocalRecognizer
from textnorm import wer

ESPEAK = ["fox", "stella", "meeting", "speech", "weather", "report"]


ENGINES = [e.strip() for e in os.environ.get("HARK_TEST_ENGINES", "ctranslate2,transformers").split(",") if e.strip()]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    engine = build_engine(AsrSettings(engine=request.param))
    yield engine
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:  # vLLM: its engine core process frees its memory for the next one
        shutdown()


def load(clip):
    return decode(clip.path, max_duration_s=7200)


def check_times(engine, transcript):
    """Segments (and words, where the engine times them) monotonic and inside the audio."""
    segments = transcript.segments
    for s in segments:
        assert 0.0 <= s.start <= s.end <= transcript.duration_s
    assert [s.start for s in segments] == sorted(s.start for s in segments)
    if engine.supports_word_timestamps:
        check_words(transcript)
    else:
        assert transcript.words == ()


def check_words(transcript):
    words = transcript.words
    assert words, "no words"
    for w in words:
        assert 0.0 <= w.start <= w.end <= transcript.duration_s
        assert 0.0 <= w.probability <= 1.0
    starts = [w.start for w in words]
    assert starts == sorted(starts)


def test_engine_implements_the_protocol(engine):
    assert isinstance(engine, AsrEngine)
    assert engine.supports_language_detection
    assert {"en", "es", "fr", "de", "zh"} <= engine.languages


def test_engine_refuses_what_it_cannot_do(engine):
    if engine.supports_word_timestamps:
        engine.check(AsrOptions(word_timestamps=True))
    else:
        with pytest.raises(InvalidParameter) as info:
            engine.check(AsrOptions(word_timestamps=True))
        assert info.value.to_body()["param"] == "timestamps"
    with pytest.raises(InvalidParameter):
        engine.check(AsrOptions(language="xx"))


def test_beckett_exact_and_batched_with_sample(engine, clips):
    beckett, sample = load(clips["beckett"]), load(clips["sample"])
    timed = engine.supports_word_timestamps
    options = [AsrOptions(word_timestamps=timed), AsrOptions(language="en", word_timestamps=timed)]
    out = engine.transcribe([beckett, sample], options)
    assert len(out) == 2
    assert wer(clips["beckett"].text, out[0].text) <= 0.1  # one word in twelve
    assert out[0].language == "en" and out[0].language_probability > 0.8
    assert wer(clips["sample"].text, out[1].text) < 0.25
    assert out[1].language_probability == 1.0  # given, not detected
    for t in out:
        check_times(engine, t)
        assert 0.5 < t.confidence <= 1.0


def test_pcm16_audio_is_cut_and_transcribed_as_its_float32(engine, clips):
    """AudioFetch hands out 16-bit PCM: the engine cuts and hears it as the float32 decoding
    (scaled, not 32768 times too loud). The cut on two copies of the sample, so that it has
    windows; the words of one copy."""
    sample = decode(clips["sample"].path, max_duration_s=7200).samples
    floats = Audio(np.concatenate([sample, np.zeros(5 * 16000, np.float32), sample]))
    pcm = Audio(np.clip(np.rint(floats.samples * 32768), -32768, 32767).astype(np.int16))
    cut = engine.cut if hasattr(engine, "cut") else engine.spans
    assert len(cut(floats)) >= 2 and cut(pcm) == cut(floats)
    options = [AsrOptions(language="en", word_timestamps=engine.supports_word_timestamps)] * 2
    from_pcm, from_floats = engine.transcribe([Audio(pcm.samples[:len(sample)]), Audio(sample)], options)
    # The same words (16 bits of rounding may at most tip a word) at the same times.
    assert wer(from_floats.text, from_pcm.text) <= 0.05
    assert wer(clips["sample"].text, from_pcm.text) < 0.3
    if engine.supports_word_timestamps:
        starts = lambda t: [round(w.start, 1) for w in t.words][:20]  # noqa: E731
        assert starts(from_pcm) == starts(from_floats) and len(starts(from_pcm)) == 20


def test_espeak_sentences(engine, clips):
    audios = [load(clips[name]) for name in ESPEAK]
    out = engine.transcribe(audios, [AsrOptions()] * len(audios))
    errors = [wer(clips[name].text, t.text) for name, t in zip(ESPEAK, out)]
    assert np.mean(errors) < 0.2, list(zip(ESPEAK, errors, [t.text for t in out]))


@pytest.mark.parametrize("name, language", [("spanish", "es"), ("french", "fr")])
def test_language_detection(engine, clips, name, language):
    [t] = engine.transcribe([load(clips[name])], [AsrOptions()])
    assert t.language == language
    assert t.text


def test_silence_gives_no_words(engine):
    silence = Audio(np.zeros(16000 * 20, dtype=np.float32))
    [t] = engine.transcribe([silence], [AsrOptions(language="en")])
    assert t.text == "" and t.confidence == 0.0 and t.duration_s == 20.0


def test_long_audio_keeps_absolute_offsets(engine, clips):
    """beckett, 50 s of silence, beckett again: every window lands where its audio is."""
    beckett = load(clips["beckett"])
    gap = np.zeros(16000 * 50, dtype=np.float32)
    long = Audio(np.concatenate([beckett.samples, gap, beckett.samples]))
    second_start = beckett.duration_s + 50.0
    [t] = engine.transcribe([long], [AsrOptions(language="en", word_timestamps=engine.supports_word_timestamps)])
    check_times(engine, t)
    first = [s for s in t.segments if s.end <= beckett.duration_s + 0.5]
    second = [s for s in t.segments if s.start >= second_start - 0.5]
    assert first and second and len(first) + len(second) == len(t.segments), [(s.start, s.end) for s in t.segments]
    for part in (first, second):
        assert wer(clips["beckett"].text, "".join(s.text for s in part)) <= 0.1
    if engine.supports_word_timestamps:
        later = [w for w in t.words if w.start >= second_start - 0.5]
        assert later[0].start == pytest.approx(second_start + t.words[0].start, abs=0.5)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_english_only_model_refuses_other_languages(clips, engine_name):
    # A second vLLM engine in this process: vLLM's CPU memory check counts the first one's
    # memory against this one's share, so it gets a larger share.
    before = engine_cores()  # the module's engine may have one already
    tiny = build_engine(
        AsrSettings(engine=engine_name, model="whisper-tiny.en", compute_type="int8", vllm_memory_utilization=0.45)
    )
    assert tiny.languages == frozenset({"en"})
    with pytest.raises(InvalidParameter) as info:
        tiny.check(AsrOptions(language="es"))
    assert info.value.to_body()["param"] == "language"
    [t] = tiny.transcribe([load(clips["beckett"])], [AsrOptions()])
    assert t.language == "en" and wer(clips["beckett"].text, t.text) < 0.2
    if hasattr(tiny, "shutdown"):  # vLLM: a clean shutdown ends its engine core process
        import psutil

        cores = [p for pid, p in engine_cores().items() if pid not in before]
        assert len(cores) == 1, "no vLLM engine core process of its own found"
        tiny.shutdown()

        def ended() -> bool:
            try:
                return not [p for p in cores if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            except psutil.NoSuchProcess:  # reaped meanwhile
                return True

        wait_until(ended, 60, what="the engine core process to end")  # it exits after the shutdown call returns
        with pytest.raises(RuntimeError, match="shut down"):
            tiny.check_health()


def engine_cores() -> dict:
    """vLLM's engine core processes under this one (titled VLLM::EngineCore; the kernel keeps 15
    characters of it), by pid."""
    import psutil

    return {p.pid: p for p in psutil.Process().children(recursive=True) if "EngineCor" in p.name()}


# ---- one bad request in a batch fails alone (review finding 3) ----------------------------------

def nan_audio(seconds: float = 3.0) -> Audio:
    """What a float WAV full of NaN decodes to: the decoder's clipping keeps NaN."""
    return Audio(np.full(int(16000 * seconds), np.nan, dtype=np.float32))


def test_a_poisoned_audio_fails_alone_in_an_engine_batch(engine, clips):
    """Regression: a batch with one audio of NaN samples gave that request an empty transcript
    (ctranslate2 with VAD; 77 s of decoding without VAD) while holding up the others."""
    out = transcribe_each(engine, [nan_audio(), load(clips["fox"])], [AsrOptions(language="en")] * 2)
    assert isinstance(out[0], InvalidAudio) and out[0].code == "INVALID_AUDIO"
    assert wer(clips["fox"].text, out[1].text) < 0.25


class SeamEngine:
    """A fake at the engine seam: "transcribes" each audio as its length, and fails every call
    that holds an audio of ``poison_len`` samples (as a model fault would)."""

    supports_word_timestamps = True
    supports_language_detection = True
    languages = frozenset({"en"})

    def __init__(self, poison_len: int) -> None:
        self.poison_len, self.calls = poison_len, []

    def check(self, options):
        Capabilities.of(self, "seam").refuse_unsupported(language=options.language)

    def transcribe(self, batch, options):
        self.calls.append([len(a.samples) for a in batch])
        if any(len(a.samples) == self.poison_len for a in batch):
            raise RuntimeError("model fault")
        return [Transcript(segments=(), language="en", language_probability=1.0, duration_s=a.duration_s) for a in batch]


def test_a_fault_inside_the_engine_fails_only_its_own_request():
    engine = SeamEngine(poison_len=200)
    batch = [Audio(np.zeros(n, np.float32)) for n in (100, 200, 300)]
    out = transcribe_each(engine, [*batch, nan_audio()], [AsrOptions(language="en")] * 3 + [AsrOptions()])
    assert [t.duration_s for t in (out[0], out[2])] == [100 / 16000, 300 / 16000]
    assert isinstance(out[1], RuntimeError) and str(out[1]) == "model fault"
    assert isinstance(out[3], InvalidAudio)  # refused before any engine call
    # One batch call first; only when it fails does each audio run on its own.
    assert engine.calls == [[100, 200, 300], [100], [200], [300]]


def test_options_an_engine_refuses_fail_only_their_own_request():
    engine = SeamEngine(poison_len=-1)
    audio = Audio(np.zeros(100, np.float32))
    out = transcribe_each(engine, [audio, audio], [AsrOptions(language="es"), AsrOptions(language="en")])
    assert isinstance(out[0], InvalidParameter) and isinstance(out[1], Transcript)
    assert engine.calls == [[100]]  # refused before the batch, which ran once without it
    assert transcribe_each(engine, [], []) == []


def test_the_in_process_recognizer_refuses_a_poisoned_audio_too():
    """The CLI and Ray Data batch path (``LocalRecognizer``) applies the same checks."""
    engine = SeamEngine(poison_len=-1)
    recognizer = LocalRecognizer(engine, "seam")
    with pytest.raises(InvalidAudio):
        asyncio.run(recognizer.transcribe(nan_audio(), AsrOptions(language="en")))
    assert engine.calls == []
    transcript = asyncio.run(recognizer.transcribe(Audio(np.zeros(100, np.float32)), AsrOptions(language="en")))
    assert transcript.duration_s == 100 / 16000 and engine.calls == [[100]]



def test_engine_warms_up_on_the_real_model(engine):
    """The warm-up the factory ran at start (pipeline.asr.warmup) decodes on every engine."""
    from pipeline.asr.warmup import warm_up

    assert warm_up(engine, "test") > 0
