"""``hark serve``: run a Serve config file, and fail loudly instead of hanging.

``serve run CONFIG`` hands the config to the Serve controller and then sleeps forever: when the
app cannot be built (an import error, a bad setting, a missing model) the controller marks it
``DEPLOY_FAILED`` in its own logs while the command sits there and every request gets nothing.
This launcher does what ``serve run`` does, plus:

1. builds every application of the config once, in this process, before Ray starts, so an
   import error or a bad ``HARK_*`` setting is printed with its traceback at once;
2. checks that the configured model can be found (a local path exists, a bundled model's
   packages are installed);
3. deploys, then watches ``serve.status()``: it prints deployment messages as they change,
   ``ready`` once every application runs, and exits non-zero with Serve's message when an
   application fails to deploy (a replica constructor that raises, say) or is not running within
   ``--ready-timeout-s``.

On SIGINT/SIGTERM it shuts Serve down (and the Ray it started) and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_BUILD_FAILED = 3
EXIT_DEPLOY_FAILED = 4
HARK_BUILDER = "deployments.app:build_app"


class LaunchError(Exception):
    """What stopped the service from starting, said for an operator."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _say(message: str) -> None:
    print(f"hark serve: {message}", file=sys.stderr, flush=True)


def load_config(path: Path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(path.read_text())
        return ServeDeploySchema.model_validate(raw)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the operator's to fix
        raise LaunchError(f"{path}: not a valid Serve config: {exc}", EXIT_BUILD_FAILED) from exc


def prebuild(config) -> None:
    """Build each application as the controller will, here, so failures surface with a traceback."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from pipeline.asr.models import check_model
    from pipeline.core.settings import Settings

    for app in config.applications:
        try:
            call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args or {})
        except Exception as exc:  # noqa: BLE001 - report, then exit
            traceback.print_exc()
            raise LaunchError(
                f"application {app.name!r} ({app.import_path}) could not be built: {type(exc).__name__}: {exc}",
                EXIT_BUILD_FAILED,
            ) from exc
        if app.import_path == HARK_BUILDER:
            from deployments.app import check_single_accounting

            for deployment in app.deployments:
                if deployment.name == "Accounting":
                    try:
                        check_single_accounting(deployment.model_dump(exclude_unset=True))
                    except ValueError as exc:
                        raise LaunchError(f"application {app.name!r}: {exc}", EXIT_BUILD_FAILED) from exc
            try:
                check_model(Settings(**((app.args or {}).get("settings") or {})).asr.model)
            except ValueError as exc:
                raise LaunchError(f"application {app.name!r}: {exc}", EXIT_BUILD_FAILED) from exc


def _app_problem(status) -> str | None:
    """A failure message when an application cannot become healthy, else None."""
    from ray.serve.schema import ApplicationStatus

    if status.status == ApplicationStatus.DEPLOY_FAILED:
        details = [f"{name}: {d.message}" for name, d in status.deployments.items() if d.message]
        return "; ".join([status.message, *details]) if status.message else "; ".join(details) or "deploy failed"
    return None


class StatusReporter:
    """Prints each deployment's status line when it changes; raises when an application failed."""

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self._seen: dict[str, str] = {}

    def running(self) -> bool:
        from ray import serve
        from ray.serve.schema import ApplicationStatus

        status = serve.status()
        running = 0
        for name in self._names:
            app = status.applications.get(name)
            if app is None:
                continue
            problem = _app_problem(app)
            if problem is not None:
                raise LaunchError(f"application {name!r} failed to deploy: {problem}", EXIT_DEPLOY_FAILED)
            for dep_name, dep in app.deployments.items():
                line = f"{dep.status.value}{': ' + dep.message if dep.message else ''}"
                if self._seen.get(f"{name}/{dep_name}") != line:
                    self._seen[f"{name}/{dep_name}"] = line
                    _say(f"{name}/{dep_name} {line}")
            running += app.status == ApplicationStatus.RUNNING
        return running == len(self._names)

    def wait_running(self, timeout_s: float, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.running():
            if time.monotonic() > deadline:
                raise LaunchError(f"not running after {timeout_s:g} s (see the deployment messages above)",
                                  EXIT_DEPLOY_FAILED)
            time.sleep(poll_s)


def deploy(config) -> None:
    """Start Serve on the connected Ray with the config's HTTP, proxy and controller options and
    hand it the config's applications, as ``serve run CONFIG`` does: the builder runs on the
    cluster and the config's ``deployments`` are applied over the decorators' (with Hark's small
    deployments kept without pandas, ``deployments/lean.py``). Returns at once; ``StatusReporter``
    (or ``serve.status()``) watches the applications come up."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import RayActorOptionsSchema

    from deployments.lean import LEAN_DEPLOYMENTS, lean

    for app in config.applications:
        # The config's ray_actor_options replace the builder's, setup hook included: add it back.
        for deployment in app.deployments if app.import_path == HARK_BUILDER else ():
            if deployment.name in LEAN_DEPLOYMENTS and deployment.ray_actor_options:
                options = lean(deployment.ray_actor_options.model_dump(exclude_unset=True))
                deployment.ray_actor_options = RayActorOptionsSchema(**options)

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)


def front_first() -> None:
    """A local Ray started after this runs its workers' Python threads at nice 0, not Ray's 15,
    so that the HTTP front (Serve's proxy, the ingress) outranks the compute replicas by far once
    they lower themselves to 19 (``compute_nice``): on a saturated 2-core machine, with a 2 h
    diarized upload and 3 live streams, /health answers over 100 ms fell from 16 of 2331 to 3 of
    2498, all three in the upload's first second (bench/bench_memory.py). Ray's own processes
    (raylet, GCS) stay at 0, above the compute replicas as before. A setting already in the
    environment wins."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def serve_config(config_path: Path, *, address: str | None, ready_timeout_s: float, dashboard: bool) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The config's import paths are resolved against the working directory, as `serve run` does.
    sys.path.insert(0, os.getcwd())
    try:
        config = load_config(config_path)
        prebuild(config)
        _say(f"{config_path}: every application built")
    except LaunchError as err:
        _say(str(err))
        return err.exit_code

    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    address = address or os.environ.get("RAY_ADDRESS") or "local"
    init: dict[str, Any] = {"address": address, "namespace": SERVE_NAMESPACE}
    if address == "local":
        init["include_dashboard"] = dashboard
        front_first()
    ray.init(**init)

    def on_signal(_signum, _frame) -> None:
        raise KeyboardInterrupt

    # Both, explicitly: a shell starts background jobs with SIGINT ignored, which Python keeps.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        deploy(config)
        reporter = StatusReporter([app.name for app in config.applications])
        reporter.wait_running(ready_timeout_s)
        http = config.http_options
        _say(f"ready on http://{http.host}:{http.port} (GET /ready)")
        while True:  # serve until stopped, still reporting replicas that fail or recover
            time.sleep(5)
            reporter.running()
    except KeyboardInterrupt:
        _say("stopping")
    except LaunchError as err:
        _say(str(err))
        code = err.exit_code
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return code
