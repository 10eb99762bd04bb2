"""The vLLM engine under the same contract as the others (tests/test_engine.py), in its own
environment: vllm pins its own torch and transformers, so it cannot share this one.
scripts/vllm-env.sh builds that environment once (cached) and this test runs the contract there.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1500)
def test_vllm_engine_meets_the_engine_contract():
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "vllm-env.sh")], capture_output=True, text=True, timeout=1200
    )
    assert build.returncode == 0, build.stderr[-4000:]
    python = build.stdout.strip().splitlines()[-1]
    env = {**os.environ, "HARK_TEST_ENGINES": "vllm"}
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    sys.stdout.write(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 8 and "skipped" not in summary and "failed" not in summary, summary
