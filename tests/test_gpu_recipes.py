"""The GPU install recipes of cluster/README.md ("Install on a GPU box") resolve, as a whole, to the
releases it names: ``pip install --dry-run --ignore-installed --report`` of this checkout with each
recipe's extras, read from pip's JSON report.

- ``[vllm]``: vllm 0.32.x with its pinned torch 2.13.0 and a transformers inside vLLM's own pin;
- ``[cuda,diarize,transformers]``: ctranslate2 4.8.5 with CUDA 12's cuBLAS (nvidia-cublas-cu12),
  and torch 2.13.0.

pip resolves with its own configuration (PyPI; on this machine also local indexes and a wheel
folder, whose CPU build of torch 2.13.0 may be the one chosen: versions are checked, not builds).
The index serves no wheel metadata of its own, so pip downloads every wheel it considers (vllm
336 MB, torch 555 MB, ...): 2-2.5 minutes a recipe here. Both resolutions therefore start, one
after the other, as soon as the session has collected its tests (conftest's
``start_in_background``) and run beside the rest of the suite; the tests wait for them at the end.
They need the package index: ``-m "not package_index"`` leaves them out.
"""

from __future__ import annotations

import atexit
import json
import logging
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

pytestmark = [pytest.mark.package_index, pytest.mark.timeout(1800)]
log = logging.getLogger(__name__)  # the resolved versions: pytest -o log_cli=true --log-cli-level=INFO

REPO = Path(__file__).resolve().parents[1]
RESOLVE_TIMEOUT_S = 900


class Resolution:
    """One ``pip install --dry-run`` of this checkout with ``extras``; its report once it is done."""

    def __init__(self, extras: str) -> None:
        self.extras = extras
        self.done = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.output = ""
        self.report: dict = {}
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                report, output = Path(tmp) / "report.json", Path(tmp) / "pip.log"
                with output.open("w") as log_file:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                         "--report", str(report), f"{REPO}[{self.extras}]"],
                        stdout=log_file, stderr=subprocess.STDOUT,
                    )
                    try:
                        self.returncode = self.proc.wait(RESOLVE_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.returncode = self.proc.wait()
                self.output = output.read_text()
                if self.returncode == 0:
                    self.report = json.loads(report.read_text())
        finally:
            self.seconds = time.monotonic() - started
            self.done.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def versions(self) -> dict[str, str]:
        """What pip would install: version by canonical name."""
        start_in_background()  # when the hook did not (a runner other than this suite's)
        assert self.done.wait(RESOLVE_TIMEOUT_S + 60), f"[{self.extras}]: no resolution"
        assert self.returncode == 0, f"[{self.extras}] did not resolve in {self.seconds:.0f} s:\n{self.output[-6000:]}"
        log.info(f"[{self.extras}] resolved in {self.seconds:.0f} s")
        return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in self.report["install"]}

    def requirement(self, of: str, name: str) -> SpecifierSet:
        """The specifier with which the package ``of`` requires ``name``, as it published it (its
        requirements that apply here, without extras)."""
        [package] = [i for i in self.report["install"] if canonicalize_name(i["metadata"]["name"]) == of]
        requirements = [Requirement(r) for r in package["metadata"]["requires_dist"]]
        [requirement] = [r for r in requirements if canonicalize_name(r.name) == name
                         and (r.marker is None or r.marker.evaluate({"extra": ""}))]
        return requirement.specifier


RESOLUTIONS = {"vllm": Resolution("vllm"), "cuda": Resolution("cuda,diarize,transformers")}
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
    assert resolution.requirement("vllm", "torch") == SpecifierSet("==2.13.0")
    assert Version(versions["torch"]).public == "2.13.0"
    # transformers inside vLLM's own pin, which is the one cluster/README.md gives.
    assert resolution.requirement("vllm", "transformers") == SpecifierSet(">=5.16.1,<5.20")
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
