"""Languages Whisper knows (ISO 639-1, plus Whisper's 'haw' and 'yue'), and request normalisation."""

from __future__ import annotations

from pipeline.core.errors import InvalidParameter

WHISPER_LANGUAGES: frozenset[str] = frozenset(
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw "
    "he hi hr ht hu hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my "
    "ne nl nn no oc pa pl ps pt ro ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt "
    "uk ur uz vi yi yo yue zh".split()
)


def normalize_language(value: str | None) -> str | None:
    """``"en-US"`` → ``"en"``; unknown codes raise ``INVALID_PARAMETER``; None/"" → detect."""
    if value is None or not value.strip():
        return None
    primary = value.strip().replace("_", "-").split("-")[0].lower()
    if primary not in WHISPER_LANGUAGES:
        shown = value if len(value) <= 40 else value[:40] + "..."  # a hostile value is not echoed whole
        raise InvalidParameter(f"Unknown language: {shown!r}", param="language")
    return primary
