"""A fresh install must import and start, and a broken one must say why and exit.

- Every module of the installed packages imports in the test environment (which CI builds from
  nothing), so a dependency missing from pyproject.toml fails the test named after its module.
- ``hark serve`` (the README's start command) serves the shipped ``serve_config.yaml``, and exits
  non-zero with the cause in its output when a setting is bad, the model is missing, or a replica
  cannot start — instead of hanging as ``serve run`` does.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port, loaded_packages, serve_replicas, wait_until
from textnorm import wer

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "deployments", "hark")
HARK = Path(sys.executable).with_name("hark")


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module", all_modules())
def test_module_imports(module):
    importlib.import_module(module)


def test_the_app_builder_builds():
    from deployments.app import build_app

    app = build_app({"settings": {"license_keys": ["k"]}})
    assert type(app).__name__ == "Application"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARK_", "RAY_ADDRESS"))}
    env.update(HARK_DATA_DIR=str(tmp_path / "data"), HARK_LICENSE_KEYS="dev-key", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _config(tmp_path: Path, port: int) -> Path:
    """The shipped serve_config.yaml, on loopback and a free port."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _serve(tmp_path: Path, timeout_s: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HARK), "serve", str(_config(tmp_path, free_port())), "--no-dashboard"],
        cwd=REPO, env=_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout_s,
    )


def test_hark_is_installed_as_a_command():
    assert HARK.is_file(), f"{HARK} missing: is hark-asr installed in this environment?"


def test_bad_setting_exits_with_the_cause(tmp_path):
    started = time.monotonic()
    run = _serve(tmp_path, 60, HARK_MAX_FILE_MB="lots")
    assert run.returncode == 3, run.stderr[-3000:]
    assert "max_file_mb" in run.stderr and "could not be built" in run.stderr
    assert time.monotonic() - started < 60


def test_missing_model_exits_with_the_cause(tmp_path):
    run = _serve(tmp_path, 60, HARK_ASR__MODEL=str(tmp_path / "no-such-model"))
    assert run.returncode == 3, run.stderr[-3000:]
    assert "no-such-model" in run.stderr and "no such directory" in run.stderr


def test_unknown_import_path_exits_with_the_cause(tmp_path):
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["applications"][0]["import_path"] = "deployments.nowhere:build_app"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run([str(HARK), "serve", str(path), "--no-dashboard"], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert "deployments.nowhere" in run.stderr


@pytest.mark.timeout(300)
def test_replica_that_cannot_start_exits_with_the_cause(tmp_path):
    # Valid as a setting, refused by CTranslate2 when the ASR replica loads the model. (Serve tries
    # a failing replica 3 times before it gives the deployment up; once is enough to see the cause.)
    run = _serve(tmp_path, 240, HARK_ASR__COMPUTE_TYPE="no_such_type", RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT="1")
    assert run.returncode == 4, run.stderr[-3000:]
    assert "failed to deploy" in run.stderr and "ASR" in run.stderr
    assert "no_such_type" in run.stderr


@pytest.mark.timeout(400)
def test_start_command_serves_a_transcription(tmp_path, clips):
    port = free_port()
    log = tmp_path / "serve.log"  # a file, not a pipe: Ray's logs would fill a pipe and block it
    with open(log, "w") as out:
        proc = subprocess.Popen([str(HARK), "serve", str(_config(tmp_path, port)), "--no-dashboard"],
                                cwd=REPO, env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, f"hark serve exited with {proc.returncode}: {log.read_text()[-3000:]}"
            # The launcher says ready once every deployment runs (GET /ready only asks ASR and
            # Accounting, so it can answer 200 a little earlier).
            return "ready on http://127.0.0.1" in log.read_text()

        wait_until(ready, 240, interval_s=1.0, what="hark serve to say it is ready")
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
        r = httpx.post(f"{base}/v1/listen", headers={"Authorization": "Token dev-key"},
                       files={"audio": clips["beckett"].path.read_bytes()}, timeout=120)
        assert r.status_code == 200, r.text
        assert wer(clips["beckett"].text, r.json()["text"]) < 0.2
        # The config's ray_actor_options replace the builder's; hark serve keeps these without pandas.
        lean = [p for name in ("Ingress", "AudioFetch", "Accounting", "Jobs") for p in serve_replicas(proc.pid, name)]
        assert len(lean) >= 4 and not [p for p in lean if loaded_packages(p)], lean
    finally:
        proc.send_signal(signal.SIGTERM)  # what a service manager sends
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "hark serve: stopping" in output
