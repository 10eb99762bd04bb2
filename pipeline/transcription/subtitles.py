"""Subtitles (SRT, WebVTT) and plain text from a transcription: the one renderer for
``/v1/listen?format=``, ``GET /v1/jobs/{id}?format=``, the OpenAI routes and ``hark batch``.

Input is a list of timed units: the engine's words (punctuation attached, leading space kept), or,
where an engine gives no word times, a segment's words with times shared out by length; from a
stored ``/v1/listen`` body, its ``words`` (marks glued back to their word) or ``utterances``.

Cues follow the rules players and broadcasters accept (BBC / Netflix timed-text guidelines): at
most 2 lines of 42 characters, at most 7 s on screen, at least ~0.8 s where the next cue leaves
room, never overlapping, a new cue at each speaker change, after a long pause and after the end
of a sentence. Times are whole milliseconds, monotonic and inside the audio.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pipeline.core.errors import InvalidParameter
from pipeline.core.types import Transcript
from pipeline.transcription.merge import group_turns
from pipeline.transcription.render import ends_sentence, strip_punctuation

SubtitleFormat = Literal["srt", "vtt"]
# What /v1/listen and GET /v1/jobs/{id} answer with ``format=``: JSON (the default) or a file.
FILE_FORMATS: dict[str, str] = {
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "text": "text/plain; charset=utf-8",
}
# Languages written without spaces between words: their units are joined as they are.
_UNSPACED = frozenset({"zh", "ja", "th", "lo", "my", "km", "bo", "yue"})


@dataclass(frozen=True)
class TimedText:
    """A word (or piece of one), as written: with its leading space where the language has them."""

    text: str
    start: float  # seconds from the start of the audio
    end: float
    speaker: str | None = None  # SPEAKER_00, ... when diarized


@dataclass(frozen=True)
class CueLimits:
    max_line_chars: int = 42
    max_lines: int = 2
    max_duration_s: float = 7.0
    min_duration_s: float = 0.8  # shorter cues are lengthened into the gap after them
    max_pause_s: float = 1.5  # a silence this long starts a new cue


@dataclass(frozen=True)
class Cue:
    start_ms: int
    end_ms: int
    lines: tuple[str, ...]
    speaker: str | None = None


def speaker_name(label: str) -> str:
    """``SPEAKER_03`` → ``Speaker 3``: the name shown in subtitles and plain text."""
    match = re.fullmatch(r"SPEAKER_(\d+)", label)
    return f"Speaker {int(match.group(1))}" if match else label


# ---- units -----------------------------------------------------------------------------------

def units_from_transcript(
    transcript: Transcript, word_speakers: Sequence[str] | None = None, *, punctuate: bool = True
) -> list[TimedText]:
    """The engine's words (with their speakers); without word times, each segment's words with
    the segment's time shared out by their length."""
    units: list[TimedText] = []
    words = transcript.words
    if words:
        for i, w in enumerate(words):
            units.append(TimedText(w.text, w.start, w.end, word_speakers[i] if word_speakers is not None else None))
    else:
        for seg in transcript.segments:
            units += _spread(seg.text, seg.start, seg.end)
    if not punctuate:
        units = [replace(u, text=_bare(u.text)) for u in units]
    return [u for u in units if u.text.strip()]


def _bare(text: str) -> str:
    bare = strip_punctuation(text)
    return (" " + bare) if bare and text[:1].isspace() else bare


def _spread(text: str, start: float, end: float) -> list[TimedText]:
    """Words of ``text`` over [start, end], each its share of the time by length."""
    pieces = re.findall(r"\s*\S+", text)
    total = sum(len(p.strip()) for p in pieces)
    if not total:
        return []
    out, at = [], start
    for piece in pieces:
        length = (end - start) * len(piece.strip()) / total
        out.append(TimedText(piece, at, at + length))
        at += length
    return out


def units_from_body(body: Mapping[str, Any]) -> list[TimedText]:
    """Units of a ``/v1/listen`` response body: its ``words`` (each mark glued back to the word it
    belongs to), else its ``utterances``. ``INVALID_PARAMETER`` (param ``format``) when it holds no
    times at all."""
    spaced = body.get("language") not in _UNSPACED
    if body.get("words") is not None:
        return _glue_marks(body["words"], spaced)
    if body.get("utterances") is not None:
        units: list[TimedText] = []
        for utt in body["utterances"]:
            if utt.get("words"):
                units += _glue_marks(utt["words"], spaced)
            else:
                units += [replace(u, speaker=_label(utt.get("speaker"))) for u in _spread(utt["transcript"], utt["start"], utt["end"])]
        return units
    if not body.get("text"):
        return []  # nothing was said: an empty subtitle file is the right answer
    raise InvalidParameter(
        "Subtitles need word times, which this result does not hold: ask with timestamps=true",
        param="format",
    )


def _label(speaker: Any) -> str | None:
    if speaker is None:
        return None
    return speaker if isinstance(speaker, str) else f"SPEAKER_{int(speaker):02d}"


def _is_mark(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


def _opens(mark: str) -> bool:
    return unicodedata.category(mark[0]) in ("Ps", "Pi") or mark in ("¿", "¡")


def _glue_marks(words: Sequence[Mapping[str, Any]], spaced: bool) -> list[TimedText]:
    """API words (a mark is its own entry) back into written words: "Hello" "," → "Hello,".

    An opening mark (``(``, ``¿``, an opening ``"``) leads the next word; any other follows the
    word before it."""
    units: list[TimedText] = []
    opening = ""  # opening marks waiting for the word they lead
    quotes = 0  # straight double quotes seen: an even count means the next one opens
    for w in words:
        text, speaker = str(w["word"]), _label(w.get("speaker"))
        if _is_mark(text):
            opens = _opens(text) or (text == '"' and quotes % 2 == 0)
            quotes += text.count('"')
            if opens or not units:
                opening += text
            else:
                units[-1] = replace(units[-1], text=units[-1].text + text)
            continue
        lead = " " if spaced and units else ""
        units.append(TimedText(lead + opening + text, float(w["start"]), float(w["end"]), speaker))
        opening = ""
    if opening and units:  # marks after the last word
        units[-1] = replace(units[-1], text=units[-1].text + opening)
    return units


# ---- cues ------------------------------------------------------------------------------------

def build_cues(units: Sequence[TimedText], duration_s: float | None, limits: CueLimits = CueLimits()) -> list[Cue]:
    """Group units into cues within ``limits``; times clamped into [0, duration_s]."""
    groups: list[list[TimedText]] = []
    for unit in _split_long(units, limits.max_line_chars):
        current = groups[-1] if groups else None
        if current is None or _starts_new_cue(current, unit, limits):
            groups.append([unit])
        else:
            current.append(unit)
    cues: list[Cue] = []
    end_limit = None if duration_s is None else int(round(duration_s * 1000))
    for i, group in enumerate(groups):
        lines = _layout(group, limits, _reserve(group[0].speaker))
        assert lines is not None  # every group was built to fit
        start, end = int(round(group[0].start * 1000)), int(round(max(u.end for u in group) * 1000))
        start = max(start, end - int(limits.max_duration_s * 1000))  # a first word that absorbed a silence
        next_start = int(round(groups[i + 1][0].start * 1000)) if i + 1 < len(groups) else None
        # Lengthen a short cue into the silence after it, never into the next cue or past the audio.
        room = [start + int(limits.min_duration_s * 1000)]
        room += [x for x in (next_start, end_limit) if x is not None]
        end = max(end, min(room))
        if end_limit is not None:
            start, end = min(start, end_limit), min(end, end_limit)
        if cues:
            start = max(start, cues[-1].end_ms)
        if end <= start:  # squeezed to nothing: zero-length words at the very end of the audio
            end = start + 1
            if end_limit is not None and end > end_limit:
                start, end = end_limit - 1, end_limit
            if cues and start < cues[-1].end_ms:  # no room left at all: the words join the cue before
                cues[-1] = _appended(cues[-1], group, limits)
                continue
        cues.append(Cue(start, end, tuple(lines), group[0].speaker))
    return cues


def _appended(cue: Cue, group: Sequence[TimedText], limits: CueLimits) -> Cue:
    """``cue`` with the words of ``group`` added (laid out again; beyond the limits if need be,
    since no word is ever dropped)."""
    units = [TimedText(line if i == 0 else " " + line, 0, 0) for i, line in enumerate(cue.lines)] + list(group)
    lines = _layout(units, limits, _reserve(cue.speaker)) or [*cue.lines, "".join(u.text for u in group).strip()]
    return replace(cue, lines=tuple(lines))


def _reserve(speaker: str | None) -> int:
    """Characters the speaker label takes on a cue's first line in SRT ("[Speaker 0] ")."""
    return len(speaker_name(speaker)) + 3 if speaker else 0


def _split_long(units: Sequence[TimedText], max_chars: int) -> list[TimedText]:
    """A unit longer than a line (a URL, a run of CJK text) as line-sized pieces, times shared out."""
    out: list[TimedText] = []
    for u in units:
        text = u.text.strip()
        width = max_chars - _reserve(u.speaker)  # the first line of a cue holds the speaker label too
        if len(text) <= width:
            out.append(u)
            continue
        lead = u.text[: len(u.text) - len(u.text.lstrip())]
        pieces = [text[i:i + width] for i in range(0, len(text), width)]
        step = (u.end - u.start) / len(pieces)
        for k, piece in enumerate(pieces):
            out.append(TimedText((lead if k == 0 else "") + piece, u.start + k * step, u.start + (k + 1) * step, u.speaker))
    return out


def _starts_new_cue(current: list[TimedText], unit: TimedText, limits: CueLimits) -> bool:
    last = current[-1]
    return (
        unit.speaker != current[0].speaker
        or unit.start - last.end > limits.max_pause_s
        or unit.end - current[0].start > limits.max_duration_s
        or ends_sentence(last.text)
        or _layout([*current, unit], limits, _reserve(current[0].speaker)) is None
    )


def _layout(units: Sequence[TimedText], limits: CueLimits, reserve: int) -> list[str] | None:
    """The units as at most ``max_lines`` lines of at most ``max_line_chars`` (the first line
    ``reserve`` shorter), breaking between units so that the longest line is shortest (a break
    after a comma preferred); None when they do not fit."""
    n = len(units)
    width = limits.max_line_chars

    def line(i: int, j: int) -> str:
        return "".join(u.text for u in units[i:j]).strip()

    # best[k][j]: (cost, previous break) of laying units[:j] out in k lines.
    inf = (float("inf"), -1)
    best = [[inf] * (n + 1) for _ in range(limits.max_lines + 1)]
    best[0][0] = (0.0, -1)
    for k in range(1, limits.max_lines + 1):
        room = width - (reserve if k == 1 else 0)
        for j in range(1, n + 1):
            for i in range(j):
                if best[k - 1][i][0] == float("inf"):
                    continue
                length = len(line(i, j))
                if length > room:
                    continue
                # The longest line decides; a break after a comma or clause mark is a little cheaper.
                bonus = 0.5 if j < n and units[j - 1].text.rstrip()[-1:] in ",;:，、" else 0.0
                cost = max(best[k - 1][i][0], length) - bonus
                if cost < best[k][j][0]:
                    best[k][j] = (cost, i)
    k = min((k for k in range(1, limits.max_lines + 1) if best[k][n][0] != float("inf")), default=None)
    if k is None:
        return None
    # The fewest lines that fit; among layouts with that many, the most balanced.
    breaks, j = [], n
    for kk in range(k, 0, -1):
        i = best[kk][j][1]
        breaks.append((i, j))
        j = i
    return [line(i, j) for i, j in reversed(breaks)]


# ---- files -----------------------------------------------------------------------------------

def _timestamp(ms: int, separator: str) -> str:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def to_srt(cues: Sequence[Cue]) -> str:
    blocks = []
    for n, cue in enumerate(cues, start=1):
        lines = list(cue.lines)
        if cue.speaker:
            lines[0] = f"[{speaker_name(cue.speaker)}] {lines[0]}"
        blocks.append(f"{n}\n{_timestamp(cue.start_ms, ',')} --> {_timestamp(cue.end_ms, ',')}\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(cues: Sequence[Cue]) -> str:
    blocks = ["WEBVTT\n"]
    for cue in cues:
        lines = [_vtt_escape(line) for line in cue.lines]
        if cue.speaker:
            # A voice span: players may style or show it; "Speaker 0" as WebVTT's own examples name voices.
            lines[0] = f"<v {_vtt_escape(speaker_name(cue.speaker))}>{lines[0]}"
        blocks.append(f"{_timestamp(cue.start_ms, '.')} --> {_timestamp(cue.end_ms, '.')}\n" + "\n".join(lines) + "\n")
    return "\n".join(blocks)


def subtitles(units: Sequence[TimedText], fmt: SubtitleFormat, duration_s: float | None,
              limits: CueLimits = CueLimits()) -> str:
    """The SRT or WebVTT file of ``units``."""
    cues = build_cues(units, duration_s, limits)
    return to_srt(cues) if fmt == "srt" else to_vtt(cues)


def plain_text(text: str, turns: Sequence[tuple[str, str]] | None = None) -> str:
    """The transcript as text; diarized, one ``Speaker N: ...`` paragraph per turn (speaker, text)."""
    if turns:
        return "\n\n".join(f"{speaker_name(who)}: {said}" for who, said in turns) + "\n"
    return text + "\n" if text else ""


def render_body(body: Mapping[str, Any], fmt: str) -> str:
    """A stored ``/v1/listen`` body (a finished job's result) as ``fmt``: srt, vtt or text."""
    if fmt == "text":
        turns = [(t["speaker"], t["text"]) for t in body.get("speakers") or []]
        return plain_text(body.get("text", ""), turns)
    return subtitles(units_from_body(body), fmt, body.get("duration"))  # type: ignore[arg-type]


def render_transcript(transcript: Transcript, fmt: str, *, word_speakers: Sequence[str] | None = None,
                      punctuate: bool = True) -> str:
    """A transcript (with one speaker label per word when diarized) as ``fmt``: srt, vtt or text."""
    if fmt == "text":
        turns = None
        if word_speakers is not None:
            turns = [(who, said) for who, said, _, _ in group_turns(transcript.words, word_speakers)]
        clean = (lambda t: t) if punctuate else strip_punctuation
        text = clean(transcript.text)
        return plain_text(text, [(who, clean(said)) for who, said in turns] if turns else None)
    units = units_from_transcript(transcript, word_speakers, punctuate=punctuate)
    return subtitles(units, fmt, transcript.duration_s)  # type: ignore[arg-type]


def parse_format(value: str | None) -> str:
    """``format=`` of ``/v1/listen`` and ``GET /v1/jobs/{id}``: json (the default), srt, vtt, text."""
    if value is None or value == "" or value == "json":
        return "json"
    if value not in FILE_FORMATS:
        value = str(value)
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidParameter(f"Unknown format {shown!r}: use json, srt, vtt or text", param="format")
    return value
