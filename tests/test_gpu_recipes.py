"""The GPU install recipes of cluster/README.md ("Install on a GPU box") resolve, as a whole, to the
releases it names: this checkout with each recipe's extras, resolved by uv's resolver (``uv pip
compile``, the resolver CI installs with), with pip's index configuration handed to it as
``.ci/run`` does:

- ``[vllm]``: vllm 0.32.x with its pinned torch 2.13.0 and a transformers inside vLLM's own pin
  (read from the vllm wheel's own metadata);
- ``[cuda,diarize,transformers]``: ctranslate2 4.8.5 with CUDA 12's cuBLAS (nvidia-cublas-cu12),
  and torch 2.13.0.

On this machine the indexes are local folders, whose CPU build of torch 2.13.0 may be the one
chosen: versions are checked, not builds. pip's own ``install --dry-run --report`` gave the same
versions, but the index serves no wheel metadata of its own, so pip downloads and hashes every wheel
it considers (vllm 336 MB, torch 555 MB, ...): ~80 s of CPU a recipe, where uv reads each wheel's
metadata alone (3 s). Both resolutions still start as soon as the session has collected its tests
(conftest's ``start_in_background``) and the tests wait for them at the end. They need the package
index: ``-m "not package_index"`` leaves them out.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from uv import find_uv_bin

pytestmark = [pytest.mark.package_index, pytest.mark.timeout(1800)]
log = logging.getLogger(__name__)  # the resolved versions: pytest -o log_cli=true --log-cli-level=INFO

REPO = Path(__file__).resolve().parents[1]
RESOLVE_TIMEOUT_S = 900
# pip's settings and the uv variables that stand for them (as .ci/run hands them over).
PIP_TO_UV = {"global.index-url": "UV_INDEX_URL", "global.extra-index-url": "UV_EXTRA_INDEX_URL",
             "global.find-links": "UV_FIND_LINKS", "global.constraint": "UV_CONSTRAINT"}


@functools.cache
def uv_environment() -> dict[str, str]:
    """This process's environment, with pip's index settings (its PIP_* variables, else its
    configuration files) for uv, which chooses among indexes as pip does (the best version from any).
    Read once (four ``pip config`` processes) for both resolutions."""
    env = {**os.environ, "UV_INDEX_STRATEGY": "unsafe-best-match"}
    for setting, variable in PIP_TO_UV.items():
        value = os.environ.get("PIP_" + setting.split(".")[1].replace("-", "_").upper()) or subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", setting], capture_output=True, text=True).stdout.strip()
        if value and variable not in env:
            env[variable] = value
    return env


class Resolution:
    """One ``uv pip compile`` of this checkout with ``extras``; the versions once it is done."""

    def __init__(self, extras: str, metadata_of: str | None = None) -> None:
        self.extras = extras
        self.metadata_of = metadata_of  # a resolved package whose published requirements are read
        self.done = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.output = ""
        self.pins: dict[str, str] = {}
        self.requires: list[str] = []
        self.seconds = 0.0

    def _uv(self, env: dict[str, str], *args: str) -> bool:
        with tempfile.TemporaryFile("w+") as log_file:
            self.proc = subprocess.Popen([find_uv_bin(), "pip", *args, "--python", sys.executable],
                                         env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                self.returncode = self.proc.wait(RESOLVE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.returncode = self.proc.wait()
            log_file.seek(0)
            self.output += log_file.read()
        return self.returncode == 0

    def run(self) -> None:
        started = time.monotonic()
        try:
            env = uv_environment()
            with tempfile.TemporaryDirectory() as tmp:
                pins = Path(tmp) / "pins.txt"
                extras = [arg for extra in self.extras.split(",") for arg in ("--extra", extra)]
                if not self._uv(env, "compile", "--quiet", "--no-header", "--no-annotate", str(REPO / "pyproject.toml"),
                                *extras, "-o", str(pins)):
                    return
                self.pins = {canonicalize_name(name): version for name, version in
                             (line.split("==", 1) for line in pins.read_text().splitlines() if "==" in line)}
                if self.metadata_of is not None:
                    # Its wheel alone, unpacked into a folder, for the requirements it publishes.
                    target = Path(tmp) / "wheel"
                    pin = f"{self.metadata_of}=={self.pins[self.metadata_of]}"
                    if not self._uv(env, "install", "--quiet", "--no-deps", "--target", str(target), pin):
                        return
                    [dist_info] = target.glob("*.dist-info")
                    self.requires = importlib.metadata.PathDistribution(dist_info).requires or []
        finally:
            self.seconds = time.monotonic() - started
            self.done.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def versions(self) -> dict[str, str]:
        """What the recipe installs: version by canonical name."""
        start_in_background()  # when the hook did not (a runner other than this suite's)
        assert self.done.wait(RESOLVE_TIMEOUT_S * 2 + 60), f"[{self.extras}]: no resolution"
        assert self.returncode == 0, f"[{self.extras}] did not resolve in {self.seconds:.0f} s:\n{self.output[-6000:]}"
        log.info(f"[{self.extras}] resolved in {self.seconds:.0f} s")
        return self.pins

    def requirement(self, name: str) -> SpecifierSet:
        """The specifier with which ``metadata_of`` requires ``name``, as it published it (its
        requirements that apply here, without extras)."""
        requirements = [Requirement(r) for r in self.requires]
        [requirement] = [r for r in requirements if canonicalize_name(r.name) == name
                         and (r.marker is None or r.marker.evaluate({"extra": ""}))]
        return requirement.specifier


RESOLUTIONS = {"vllm": Resolution("vllm", metadata_of="vllm"), "cuda": Resolution("cuda,diarize,transformers")}
_started = threading.Event()


def start_in_background(test_name: str | None = None) -> None:
    """Both resolutions, one after the other, in a thread (conftest calls this once the session has
    collected its tests)."""
    if _started.is_set():
        return
    _started.set()
    for resolution in RESOLUTIONS.values():
        atexit.register(resolution.stop)
    threading.Thread(target=lambda: [r.run() for r in RESOLUTIONS.values()], name="hark-recipes", daemon=True).start()


def test_the_vllm_recipe_resolves_to_vllm_0_32_and_its_torch():
    resolution = RESOLUTIONS["vllm"]
    versions = resolution.versions()
    log.info(f"[vllm]: vllm {versions['vllm']}, torch {versions['torch']}, transformers {versions['transformers']}")
    assert Version(versions["vllm"]) in SpecifierSet("==0.32.*")
    # vLLM pins torch exactly; a local CPU build of it carries a build tag (2.13.0+cpu).
    assert resolution.requirement("torch") == SpecifierSet("==2.13.0")
    assert Version(versions["torch"]).public == "2.13.0"
    # transformers inside vLLM's own pin, which is the one cluster/README.md gives.
    assert resolution.requirement("transformers") == SpecifierSet(">=5.16.1,<5.20")
    assert Version(versions["transformers"]) in SpecifierSet(">=5.16.1,<5.20")


def test_the_cuda_recipe_resolves_to_ctranslate2_4_8_5_and_cuda_12_cublas():
    versions = RESOLUTIONS["cuda"].versions()
    log.info(f"[cuda,diarize,transformers]: ctranslate2 {versions['ctranslate2']}, "
             f"nvidia-cublas-cu12 {versions.get('nvidia-cublas-cu12')}, torch {versions['torch']}")
    # The release whose wheel opens libcublas.so.12 (cluster/README.md): a newer one must be checked
    # for the cuBLAS it opens before this changes.
    assert versions["ctranslate2"] == "4.8.5"
    assert Version(versions["nvidia-cublas-cu12"]) in SpecifierSet(">=12.4,<13")
    assert Version(versions["torch"]).public == "2.13.0"
