"""The subtitle renderer, checked by parsers no one here wrote: ``srt`` and ``webvtt-py`` from
PyPI, and FFmpeg's subtitle demuxers."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta

import pytest
import srt
import webvtt

from pipeline.core.errors import InvalidParameter
from pipeline.core.types import Segment, Transcript, Word
from pipeline.transcription.subtitles import (
    CueLimits,
    TimedText,
    build_cues,
    plain_text,
    render_body,
    subtitles,
    units_from_body,
    units_from_transcript,
)

LOREM = (
    "Speech recognition turns spoken words into written text, and subtitles show that text on "
    "screen while people speak. Good cues are short, easy to read and never stay too long. "
    "Internationalization-and-localization-of-very-long-identifiers-happens-sometimes too."
)


def _words(text: str, start: float = 0.2, step: float = 0.35, speakers=None) -> tuple[Word, ...]:
    out, t = [], start
    for i, token in enumerate(text.split(" ")):
        out.append(Word(" " + token, t, t + step * 0.8, 0.9))
        t += step
    return tuple(out)


def _transcript(words: tuple[Word, ...], duration: float) -> Transcript:
    text = "".join(w.text for w in words)
    return Transcript((Segment(text, words[0].start, words[-1].end, -0.2, len(words), words),), "en", 1.0, duration)


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _vtt_seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _check_times(spans: list[tuple[float, float]], duration: float) -> None:
    """Every cue inside the audio, positive, and no cue before or over its predecessor."""
    previous_end = 0.0
    for start, end in spans:
        assert 0 <= start < end <= duration + 1e-9, (start, end, duration)
        assert start >= previous_end - 1e-9, (start, previous_end)
        previous_end = end


def _parse_srt(text: str, duration: float) -> list[srt.Subtitle]:
    subs = list(srt.parse(text))  # raises on malformed blocks
    _check_times([(s.start.total_seconds(), s.end.total_seconds()) for s in subs], duration)
    return subs


def _parse_vtt(text: str, duration: float) -> list:
    captions = list(webvtt.WebVTT.from_string(text, strict=True))
    _check_times([(_vtt_seconds(c.start), _vtt_seconds(c.end)) for c in captions], duration)
    return captions


def _ffmpeg_reads(tmp_path, text: str, suffix: str) -> list[srt.Subtitle]:
    """The cues FFmpeg's demuxer reads from ``text``, converted by FFmpeg to SRT and parsed back."""
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is needed for the subtitle tests: apt-get install ffmpeg")
    path = tmp_path / f"out.{suffix}"
    path.write_text(text, encoding="utf-8")
    # -xerror: any complaint of the demuxer or decoder is fatal.
    run = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "srt", "-"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr
    return list(srt.parse(run.stdout))


def _ffmpeg_accepts(tmp_path, text: str, suffix: str, cues: int) -> None:
    read = _ffmpeg_reads(tmp_path, text, suffix)
    assert len(read) == cues


def test_long_text_becomes_short_cues_that_real_parsers_and_ffmpeg_read(tmp_path):
    words = _words(LOREM)
    duration = words[-1].end + 1.0
    transcript = _transcript(words, duration)
    limits = CueLimits()
    srt_text = subtitles(units_from_transcript(transcript), "srt", duration)
    subs = _parse_srt(srt_text, duration)
    vtt_text = subtitles(units_from_transcript(transcript), "vtt", duration)
    captions = _parse_vtt(vtt_text, duration)
    assert len(subs) == len(captions) > 3
    for sub in subs:
        lines = sub.content.split("\n")
        assert 1 <= len(lines) <= limits.max_lines
        assert all(len(line) <= limits.max_line_chars for line in lines), lines
        assert (sub.end - sub.start) <= timedelta(seconds=limits.max_duration_s)
    # Nothing lost or reordered: the cues read back as the transcript (the over-long identifier is
    # cut at a line's width, so spaces are compared apart).
    assert _squeeze(" ".join(s.content for s in subs)) == _squeeze(transcript.text)
    assert _squeeze(" ".join(c.text for c in captions)) == _squeeze(transcript.text)
    assert " ".join(s.content.replace("\n", " ") for s in subs[:3]) == " ".join(transcript.text.split()[:len(" ".join(s.content.replace("\n", " ") for s in subs[:3]).split())])
    # A sentence ends a cue.
    assert any(s.content.endswith("speak.") for s in subs)
    _ffmpeg_accepts(tmp_path, srt_text, "srt", len(subs))
    _ffmpeg_accepts(tmp_path, vtt_text, "vtt", len(subs))


def test_speakers_start_new_cues_and_are_labelled(tmp_path):
    first = _words("Hello there, how are you doing today?", 0.0)
    second = _words("I am fine, thank you very much for asking me.", first[-1].end + 0.3)
    words = first + second
    speakers = ["SPEAKER_00"] * len(first) + ["SPEAKER_01"] * len(second)
    duration = words[-1].end + 0.5
    units = units_from_transcript(_transcript(words, duration), speakers)
    vtt_text = subtitles(units, "vtt", duration)
    captions = _parse_vtt(vtt_text, duration)
    assert [c.voice for c in captions] == ["Speaker 0", "Speaker 1"]
    assert "<v Speaker 0>Hello there" in vtt_text
    subs = _parse_srt(subtitles(units, "srt", duration), duration)
    assert subs[0].content.startswith("[Speaker 0] Hello there,")
    assert subs[1].content.startswith("[Speaker 1] I am fine,")
    for sub in subs:  # the label counts against the line length
        assert all(len(line) <= 42 for line in sub.content.split("\n"))
    _ffmpeg_accepts(tmp_path, vtt_text, "vtt", 2)


def test_short_cues_are_lengthened_into_silence_but_never_overlap_or_leave_the_audio():
    words = (Word(" Yes.", 1.0, 1.1, 0.9), Word(" No.", 1.2, 1.3, 0.9), Word(" End.", 4.0, 4.0, 0.9))
    cues = build_cues(units_from_transcript(_transcript(words, 4.0)), 4.0)
    assert [(c.start_ms, c.end_ms) for c in cues] == [(1000, 1200), (1200, 2000), (3999, 4000)]


def test_markup_is_escaped_in_vtt_and_cjk_is_joined_without_spaces():
    words = (Word("<b>", 0.0, 0.5, 0.9), Word(" &", 0.5, 1.0, 0.9))
    text = subtitles(units_from_transcript(_transcript(words, 1.0)), "vtt", 1.0)
    assert "&lt;b&gt; &amp;" in text
    assert len(_parse_vtt(text, 1.0)) == 1
    cjk = tuple(Word(ch, i * 0.2, i * 0.2 + 0.2, 0.9) for i, ch in enumerate("今天天气很好我们去公园散步吧" * 4))
    subs = _parse_srt(subtitles(units_from_transcript(_transcript(cjk, 12.0)), "srt", 12.0), 12.0)
    assert "".join(s.content.replace("\n", "") for s in subs) == "今天天气很好我们去公园散步吧" * 4


def test_segments_without_word_times_share_their_time_out():
    segment = Segment(" " + LOREM, 0.0, 30.0, -0.2, 80)
    transcript = Transcript((segment,), "en", 1.0, 30.0)
    subs = _parse_srt(subtitles(units_from_transcript(transcript), "srt", 30.0), 30.0)
    assert len(subs) > 3 and subs[-1].end.total_seconds() == pytest.approx(30.0)
    assert all(len(line) <= 42 for s in subs for line in s.content.split("\n"))


def test_a_stored_body_renders_the_same_cues_as_the_transcript():
    body = {
        "text": "“Hello,” she said (quietly). ¿Qué?",
        "duration": 5.0,
        "language": "en",
        "words": [
            {"word": "“", "start": 0.0, "end": 0.0, "confidence": 1.0},
            {"word": "Hello", "start": 0.1, "end": 0.5, "confidence": 0.9},
            {"word": ",", "start": 0.5, "end": 0.5, "confidence": 1.0},
            {"word": "”", "start": 0.5, "end": 0.5, "confidence": 1.0},
            {"word": "she", "start": 0.6, "end": 0.8, "confidence": 0.9},
            {"word": "said", "start": 0.8, "end": 1.0, "confidence": 0.9},
            {"word": "(", "start": 1.0, "end": 1.0, "confidence": 1.0},
            {"word": "quietly", "start": 1.1, "end": 1.5, "confidence": 0.9},
            {"word": ")", "start": 1.5, "end": 1.5, "confidence": 1.0},
            {"word": ".", "start": 1.5, "end": 1.5, "confidence": 1.0},
            {"word": "¿", "start": 1.5, "end": 1.5, "confidence": 1.0},
            {"word": "Qué", "start": 2.0, "end": 2.4, "confidence": 0.9},
            {"word": "?", "start": 2.4, "end": 2.4, "confidence": 1.0},
        ],
    }
    assert "".join(u.text for u in units_from_body(body)) == body["text"]
    subs = _parse_srt(render_body(body, "srt"), 5.0)
    assert [s.content for s in subs] == ["“Hello,” she said (quietly).", "¿Qué?"]
    assert render_body(body, "text") == body["text"] + "\n"


def test_a_body_without_times_is_refused_naming_format_and_text_still_works():
    body = {"text": "Hello there.", "duration": 2.0, "language": "en",
            "speakers": [{"speaker": "SPEAKER_00", "text": "Hello there.", "start": 0.0, "end": 1.0}]}
    with pytest.raises(InvalidParameter) as err:
        render_body(body, "vtt")
    assert err.value.extra["param"] == "format"
    assert render_body(body, "text") == "Speaker 0: Hello there.\n"
    # Nothing said: an empty but valid file, not an error.
    assert _parse_vtt(render_body({"text": "", "duration": 2.0, "language": "en"}, "vtt"), 2.0) == []


def test_unpunctuated_units_and_plain_text():
    words = (Word(" Hello,", 0.0, 0.5, 0.9), Word(" World!", 0.6, 1.0, 0.9))
    units = units_from_transcript(_transcript(words, 1.0), punctuate=False)
    assert [u.text for u in units] == [" hello", " world"]
    assert plain_text("") == ""
    assert plain_text("a b", [("SPEAKER_00", "a"), ("SPEAKER_01", "b")]) == "Speaker 0: a\n\nSpeaker 1: b\n"
    assert build_cues([TimedText(" x", 0.0, 0.1)], None)[0].end_ms == 800
