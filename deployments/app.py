"""The one app builder, named in ``serve_config.yaml``: ``deployments.app:build_app``."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.accounting import AccountingDeployment
from deployments.asr import AsrDeployment
from deployments.diarization import DiarizationDeployment
from deployments.fetch import AudioFetchDeployment
from deployments.ingress import Ingress
from deployments.jobs import JobsDeployment
from deployments.lean import LEAN_DEPLOYMENTS, lean
from pipeline.core.settings import Settings


def check_single_accounting(options: dict[str, Any]) -> None:
    """Accounting holds the rolling-minute and concurrency counts of every key in its memory: two
    replicas would split them (and a release could reach the wrong one), so exactly one."""
    if options.get("num_replicas", 1) != 1 or options.get("autoscaling_config"):
        raise ValueError("Accounting must run exactly one replica (num_replicas: 1, no autoscaling_config)")


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Compose Ingress → (AudioFetch, ASR, Diarization, Accounting, Jobs → (the same four)).

    Settings merge defaults → ``HARK_*`` environment of the deploying process → ``args["settings"]``
    (from the config file's ``args`` or a caller). They are built here once and handed to every
    deployment, so each replica runs with them wherever it is placed. Deployment options (replicas,
    queues, CPUs) come from the decorators, then ``args["deployment_options"]`` (by deployment name),
    then ``serve_config.yaml``'s ``deployments`` section, which Serve applies last.
    """
    args = dict(args or {})
    settings = args.pop("settings", None)
    if not isinstance(settings, Settings):
        settings = Settings(**(settings or {}))
    overrides: dict[str, dict[str, Any]] = args.pop("deployment_options", None) or {}
    if args:
        raise ValueError(f"Unknown app arguments: {sorted(args)}")
    unknown = set(overrides) - {"Ingress", "AudioFetch", "ASR", "Diarization", "Accounting", "Jobs"}
    if unknown:
        raise ValueError(f"Unknown deployments in deployment_options: {sorted(unknown)}")
    check_single_accounting(overrides.get("Accounting", {}))

    def configured(deployment):
        options = dict(overrides.get(deployment.name, {}))
        if deployment.name in LEAN_DEPLOYMENTS:  # without pandas (deployments/lean.py)
            options["ray_actor_options"] = lean(options.get("ray_actor_options", deployment.ray_actor_options or {}))
        return deployment.options(**options)

    fetch = configured(AudioFetchDeployment).bind(settings)
    asr = configured(AsrDeployment).bind(settings)
    diarization = configured(DiarizationDeployment).bind(settings)
    accounting = configured(AccountingDeployment).bind(settings)
    jobs = configured(JobsDeployment).bind(settings, fetch, asr, diarization, accounting)
    return configured(Ingress).bind(settings, fetch, asr, diarization, accounting, jobs)
