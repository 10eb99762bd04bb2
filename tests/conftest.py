"""Shared fixtures: real speech, a real HTTP server, moto's S3 server, one Ray Serve app."""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Before any OpenMP runtime starts (torch, CTranslate2; Ray's workers and the suites run beside this
# one inherit it): idle OpenMP threads sleep instead of spinning. The suite runs several model
# processes on 2 cores, and spinning threads take the cores from each other: the transformers
# engine's beckett test took 147 s beside 3 busy processes, 78 s with this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import assets  # noqa: E402
from servers import MediaServer  # noqa: E402

# tests/pyannote_env needs pyannote.audio's own environment; tests/test_separate_envs.py runs it there.
collect_ignore_glob = ([] if os.environ.get("HARK_IN_PYANNOTE_ENV") else ["pyannote_env/*"]) + (
    [] if os.environ.get("HARK_IN_VLLM_ENV") else ["vllm_env/*"])

API_KEYS = ("test-key-1", "test-key-2")
# Keys with their own limits, one per limits test (the plain keys are effectively unlimited).
LIMITED_KEYS = {
    "rpm-key": {"requests_per_minute": 60, "concurrent_requests": 0},
    "conc-key": {"requests_per_minute": 0, "concurrent_requests": 10},
    "quota-key": {"requests_per_minute": 0, "audio_hours_per_day": 15 / 3600},
    "quota2-key": {"requests_per_minute": 0, "audio_hours_per_day": 15 / 3600},
    "retry-key": {"requests_per_minute": 0, "concurrent_requests": 1},
    "disc-key": {"requests_per_minute": 0, "concurrent_requests": 1},
    "pg-quota-key": {"requests_per_minute": 0, "audio_hours_per_day": 1 / 3600},  # test_playground
    "openai-rpm-key": {"requests_per_minute": 1},
}
S3_BUCKET = "hark-audio"
WEBHOOK_SECRET = "whsec_" + __import__("base64").b64encode(b"hark-test-webhook-secret").decode()
# API_KEYS[1] signs its deliveries with its own secret.
KEY_WEBHOOK_SECRET = "whsec_" + __import__("base64").b64encode(b"the-second-keys-own-secret").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def serve_replicas(root_pid: int, deployment: str, app: str = "hark") -> list:
    """The processes of ``deployment``'s replicas among ``root_pid``'s descendants (a Ray node's
    raylet, or what started it): Ray titles an actor's process ``ray::ServeReplica:<app>:<name>``."""
    import psutil

    title = f"ray::ServeReplica:{app}:{deployment}"
    found = []
    for process in psutil.Process(root_pid).children(recursive=True):
        try:  # Ray starts and ends idle workers all the time: one may be gone already
            command = process.cmdline()
        except psutil.Error:
            continue
        if command and command[0].startswith(title):
            found.append(process)
    return found


def loaded_packages(process, names: tuple[str, ...] = ("pandas", "pyarrow")) -> set[str]:
    """Which of ``names`` the process has loaded (their compiled modules are mapped)."""
    return {name for name in names for m in process.memory_maps() if f"{os.sep}{name}{os.sep}" in m.path}


# Each runs in a pytest process of its own beside the rest (tests/test_separate_envs.py), with a Ray
# of its own; named on the command line, it is collected as usual.
collect_ignore = ["test_multinode.py", "test_gpu_placement.py", "test_install.py"]


def pytest_collection_modifyitems(session, config, items) -> None:
    # The tests that wait for a background run (tests/test_separate_envs.py) go last: their runs
    # get the whole suite's time to finish.
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "start_in_background", None) is not None)


_background: list[Callable[[], None]] = []


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly:
        return
    # The suites that run in environments of their own (tests/test_separate_envs.py) and the
    # install-recipe resolutions run beside the rest: their time overlaps the suite's instead of
    # adding to it. They start once the shared Serve app is up (at once if no test uses it): its
    # proxy and replicas run their Python at Ray's worker nice 15, and starting beside a vLLM
    # engine and pip at nice 0 their readiness checks timed out again and again (CI, 2026-12-02).
    for item in session.items:
        start = getattr(getattr(item, "module", None), "start_in_background", None)
        if start is not None:
            _background.append(functools.partial(start, item.name))
    if not any("serve_app" in item.fixturenames for item in session.items):
        start_background()


def start_background() -> None:
    """Start the background runs collected (once)."""
    while _background:
        _background.pop(0)()


@pytest.fixture(scope="session")
def clips() -> dict[str, assets.Clip]:
    return assets.prepare()


@pytest.fixture(scope="session")
def media_server():
    with MediaServer() as server:
        yield server


@pytest.fixture(scope="session")
def receiver():
    from servers import WebhookReceiver

    with WebhookReceiver(WEBHOOK_SECRET) as server:
        yield server


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hark-data")


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of its own for the session (tests/postgres.py)."""
    from postgres import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def job_db_url(request, tmp_path):
    """An empty job database, on SQLite and on PostgreSQL: the job store's tests run on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; the AWS_* variables point every process at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=S3_BUCKET)
    yield client
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def app_settings_overrides(data_dir) -> dict:
    return {
        "data_dir": str(data_dir),
        "webhook_secret": WEBHOOK_SECRET,
        "webhook_secrets": {API_KEYS[1]: KEY_WEBHOOK_SECRET},
        "webhook_backoff_base_s": 0.2,
        "webhook_backoff_max_s": 1.0,
        "webhook_max_attempts": 4,
        "jobs_lease_s": 3.0,
        "stream_idle_timeout_s": 2.0,
        "license_keys": [*API_KEYS, *LIMITED_KEYS],
        "limits": {"requests_per_minute": 100_000, "concurrent_requests": 1000, "per_key": LIMITED_KEYS},
        "allow_private_urls": False,
        # The media server lives on 127.0.0.1; every other private address stays refused.
        "url_allowlist": ["127.0.0.1/32"],
        # API callers may read the test bucket's calls/ folder only.
        "s3_allow": [f"{S3_BUCKET}/calls"],
        "fetch_read_timeout_s": 2.0,
        "retry_after_s": 17,
    }


@pytest.fixture(scope="session")
def serve_app(s3_server, data_dir):
    """One Ray Serve app for the whole session (it takes ~15 s to start)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
    app = build_app(app_args(data_dir))
    serve.run(app, name="hark", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{base}/ready", timeout=10).status_code == 200, 120, what="/ready")
    start_background()
    yield base
    serve.shutdown()
    ray.shutdown()


def app_args(data_dir) -> dict:
    return {
        "settings": app_settings_overrides(data_dir),
        "deployment_options": {
            # Two ingress replicas: limits must hold across both.
            "Ingress": {"num_replicas": 2},
            "AudioFetch": {"num_replicas": 2},
            # Small queues so that the overload test can fill them.
            "ASR": {"max_ongoing_requests": 2, "max_queued_requests": 2},
        },
    }


@pytest.fixture()
def api(serve_app):
    with httpx.Client(base_url=serve_app, timeout=300, headers={"Authorization": f"Token {API_KEYS[0]}"}) as client:
        yield client
