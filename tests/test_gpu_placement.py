"""The GPU profiles place replicas as written, on a Ray instance with two fake GPUs.

Ray schedules by ``num_gpus`` whether a card exists or not (``ray.init(num_gpus=2)`` on this CPU
machine): it gives each actor GPU ids and a share of them and sets CUDA_VISIBLE_DEVICES in it.
``cluster/serve_config.gpu.yaml`` is deployed as ``hark serve`` deploys a config
(``deployments.launch``), changed only where a CPU machine must differ: the engines on the CPU
(CTranslate2 in int8 with the cheaper bundled model, whisper-tiny.en; the diarizer on the CPU), the
deployments' num_cpus shrunk so that the graph fits 2 cores, HTTP on loopback, the test's own
license key and data directory, and ASR at 3 replicas instead of autoscaling, one more than 2 GPUs
hold at 0.8 each. num_gpus is as written.

The issue asked for a stub engine; the engines here are the real ones on the CPU, so what is
placed is an app that transcribes and diarizes (a request goes through it).

What each replica was given is asked of the replica itself: Ray's ``__ray_call__`` runs a function
in the replica's process (``ray.get_gpu_ids()``, its assigned resources, and
``deployments.asr.assigned_gpu_share``, which the ASR replica hands to ``build_engine``), so no
deployment carries code for the test. (Ray's state API would report what each actor asked for,
not the GPU ids it got, and it needs the dashboard, which this Ray runs without.) A replica Ray
could not place is what Serve reports as waiting to be scheduled, and it cannot answer.

Runs in a pytest process of its own (tests/test_separate_envs.py), like tests/test_multinode.py:
a process holds one Ray connection, and the session's app (conftest's ``serve_app``) holds it on a
Ray without GPUs. Name the file to run it alone.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port, wait_until
from textnorm import wer

pytestmark = pytest.mark.timeout(600)
log = logging.getLogger(__name__)  # the measured figures: pytest -o log_cli=true --log-cli-level=INFO

ROOT = Path(__file__).parent.parent
PROFILE = ROOT / "cluster" / "serve_config.gpu.yaml"
PROFILE_80GB = ROOT / "cluster" / "serve_config.gpu-80gb.yaml"
KEY = "gpu-placement-key"
FAKE_GPUS = 2
ASR_REPLICAS = 3  # one more than FAKE_GPUS hold at 0.8 each
# The profile's engines on the CPU; everything else under `settings` stays as written.
CPU_SETTINGS = {
    "asr": {"device": "cpu", "compute_type": "int8", "dtype": "float32", "model": "whisper-tiny.en"},
    "diarization": {"device": "cpu"},
}
# Ray's num_cpus of the two compute deployments (2 and 1 in the profile): the whole graph, with
# every ASR replica asked for, needs 1.3 of the 2 CPUs given to Ray, so only GPUs can keep an ASR
# replica out.
CPU_SHARES = {"ASR": 0.25, "Diarization": 0.25}
# Serve reports a replica still waiting for resources after 30 s by default; the test reads that report.
SERVE_SLOW_START = {"RAY_SERVE_SLOW_STARTUP_WARNING_S": "2", "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "2"}
START_TIMEOUT_S = 300


def on_this_machine(profile: Path, port: int, data_dir: Path) -> dict:
    """The profile with the changes this CPU machine needs (the module's docstring lists them)."""
    config = yaml.safe_load(profile.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    [app] = config["applications"]
    settings = app["args"]["settings"]
    for section, values in CPU_SETTINGS.items():
        settings[section].update(values)
    settings.update(license_keys=[KEY], data_dir=str(data_dir))
    for deployment in app["deployments"]:
        if deployment["name"] in CPU_SHARES:
            deployment["ray_actor_options"]["num_cpus"] = CPU_SHARES[deployment["name"]]
        if deployment["name"] == "ASR":
            del deployment["autoscaling_config"]
            deployment["num_replicas"] = ASR_REPLICAS
    return config


def placement(profile: Path) -> dict[str, dict]:
    """What decides where a profile's replicas go: each deployment's actor options and replica counts."""
    [app] = yaml.safe_load(profile.read_text())["applications"]
    return {
        d["name"]: {
            "ray_actor_options": d.get("ray_actor_options"),
            "num_replicas": d.get("num_replicas"),
            "replicas": {k: v for k, v in (d.get("autoscaling_config") or {}).items() if k.endswith("_replicas")},
        }
        for d in app["deployments"]
    }


def test_the_80gb_profile_places_replicas_as_the_24gb_one():
    # Its batches and queues are larger; placement is the same, so the deployment below covers both.
    assert placement(PROFILE_80GB) == placement(PROFILE)
    assert placement(PROFILE)["ASR"]["ray_actor_options"]["num_gpus"] == 0.8
    assert placement(PROFILE)["Diarization"]["ray_actor_options"]["num_gpus"] == 0.2


@pytest.fixture(scope="module")
def gpu_app(tmp_path_factory):
    import ray
    from ray import serve

    from deployments.launch import deploy, load_config, prebuild

    workdir = tmp_path_factory.mktemp("gpu-placement")
    port = free_port()
    path = workdir / "serve_config.gpu.yaml"
    path.write_text(yaml.safe_dump(on_this_machine(PROFILE, port, workdir / "data")))
    config = load_config(path)
    prebuild(config)
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as env:
        # Ray's processes (the Serve controller among them) take this environment at ray.init.
        for name, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **SERVE_SLOW_START}.items():
            env.setenv(name, value)
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=FAKE_GPUS,
            object_store_memory=256 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        deploy(config)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            app = serve.status().applications.get("hark")
            assert app is None or app.status != "DEPLOY_FAILED", app.message
            try:
                return httpx.get(f"{base}/ready", timeout=10).status_code == 200
            except httpx.TransportError:  # the proxy is not listening yet
                return False

        # /ready: every deployment has a running replica (ASR's third one never will); then both
        # GPUs' ASR replicas.
        wait_until(ready, START_TIMEOUT_S, interval_s=1, what="/ready")
        wait_until(lambda: asr_replica_states().get("RUNNING") == FAKE_GPUS, 120,
                   what=f"{FAKE_GPUS} running ASR replicas")
        log.info(f"deployed to ready in {time.monotonic() - started:.1f} s")
        yield base
    finally:
        # The Ray this fixture started goes with every process of it: a graceful serve.shutdown()
        # would wait on ASR's graceful_shutdown_timeout_s and the replica that never started.
        ray.shutdown()


def ask_replicas() -> tuple[dict[str, list[dict]], list[str]]:
    """Every replica of the app asked in its own process (Ray's ``__ray_call__``): its GPU ids,
    assigned resources, CUDA_VISIBLE_DEVICES and ``assigned_gpu_share()``, the share the ASR
    replica hands to ``build_engine``. Returns the answers by deployment, and the replicas that
    cannot answer because Ray has not placed them (their calls wait for the actor to start)."""
    import ray
    from ray import serve

    def ask(_replica_actor) -> dict:  # runs in the replica (nested, so Ray ships it by value)
        import os

        import ray

        from deployments.asr import assigned_gpu_share

        return {
            "gpu_ids": [int(i) for i in ray.get_gpu_ids()],
            "resources": ray.get_runtime_context().get_assigned_resources(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_share": assigned_gpu_share(),
        }

    running = sum(d.replica_states.get("RUNNING", 0) for d in serve.status().applications["hark"].deployments.values())
    # Replica actors are named SERVE_REPLICA::<app>#<deployment>#<replica id>.
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::hark#")]
    calls = {ray.get_actor(a["name"], namespace=a["namespace"]).__ray_call__.remote(ask): a["name"] for a in names}
    answered, unanswered = ray.wait(list(calls), num_returns=running, timeout=60)
    assert len(answered) == running, f"{len(answered)} of {running} running replicas answered"
    facts = defaultdict(list)
    for call, answer in zip(answered, ray.get(answered)):
        facts[calls[call].split("#")[1]].append(answer)
    return dict(facts), [calls[call] for call in unanswered]


def asr_replica_states() -> dict[str, int]:
    from ray import serve

    states = serve.status().applications["hark"].deployments["ASR"].replica_states
    return {getattr(state, "value", state): count for state, count in states.items()}


def test_a_request_transcribes_and_diarizes_on_the_placed_replicas(gpu_app, clips):
    r = httpx.post(f"{gpu_app}/v1/listen", files={"audio": clips["fox"].path.read_bytes()}, data={"diarize": "true"},
                   headers={"Authorization": f"Token {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert wer(clips["fox"].text, body["text"]) < 0.5, body["text"]
    assert {turn["speaker"] for turn in body["speakers"]} == {"SPEAKER_00"}


def test_each_replica_has_the_gpu_share_written_and_no_gpu_is_overcommitted(gpu_app):
    facts, _ = ask_replicas()
    log.info(f"replicas: {facts}")
    asr, [diarizer] = facts["ASR"], facts["Diarization"]
    assert len(asr) == FAKE_GPUS
    for replica in [*asr, diarizer]:
        [gpu] = replica["gpu_ids"]  # a share of one GPU, never of two
        assert replica["cuda_visible_devices"] == str(gpu)
    for replica in asr:
        assert replica["resources"] == {"CPU": CPU_SHARES["ASR"], "GPU": 0.8}
        # What the replica hands build_engine: the engines size themselves by it.
        assert replica["gpu_share"] == 0.8
    assert diarizer["resources"] == {"CPU": CPU_SHARES["Diarization"], "GPU": 0.2}
    assert diarizer["gpu_share"] == 0.2
    # One ASR replica per GPU, and ASR with the diarizer beside it fills a GPU without going over.
    assert sorted(r["gpu_ids"][0] for r in asr) == list(range(FAKE_GPUS))
    used = defaultdict(float)
    for replica in [*asr, diarizer]:
        used[replica["gpu_ids"][0]] += replica["resources"]["GPU"]
    log.info(f"GPU shares in use: {dict(used)}")
    assert sorted(round(share, 3) for share in used.values()) == [0.8, 1.0]
    # The small deployments take no GPU.
    for name in ("Ingress", "AudioFetch", "Accounting", "Jobs"):
        assert all(r["gpu_ids"] == [] and "GPU" not in r["resources"] for r in facts[name]), facts[name]


def test_the_share_the_asr_replica_reports_sizes_the_gpu_engines_as_documented(gpu_app):
    from pipeline.asr.sizing import WINDOW_ENCODER_TOKENS, torch_memory_fraction, vllm_sizing
    from pipeline.core.settings import Settings

    [share] = {r["gpu_share"] for r in ask_replicas()[0]["ASR"]}
    # With the profile's settings as written (on CUDA), what the engines derive from that share:
    # vLLM's gpu_memory_utilization and the transformers engine's per-process cap are 0.85 of it,
    # 0.68 of the card, and vLLM takes 6 new windows' encoders a step (the profile's header,
    # cluster/README.md). The engine here runs on the CPU, where none of them applies.
    [app] = yaml.safe_load(PROFILE.read_text())["applications"]
    sizing = vllm_sizing(Settings(**app["args"]["settings"]).asr, "cuda", share)
    assert sizing.memory_utilization == 0.68 and torch_memory_fraction(share) == 0.68
    assert sizing.max_num_batched_tokens == 6 * WINDOW_ENCODER_TOKENS
    assert sizing.max_num_seqs == 32  # the profile's vllm_max_num_seqs


def test_asr_replicas_beyond_the_gpus_stay_pending(gpu_app):
    import ray
    from ray import serve

    def pending() -> str | None:
        """Serve's report of a replica it has asked Ray for and Ray has not placed, once it gives one."""
        message = serve.status().applications["hark"].deployments["ASR"].message
        return message if "to be scheduled" in message else None

    message = wait_until(pending, 60, interval_s=0.5, what="Serve to report an ASR replica waiting for resources")
    log.info(f"Serve: {message}")
    assert "has 1 replicas that have taken more than" in message, message
    required, available = (json.loads(m) for m in re.findall(r"\{[^}]*\}", message))
    assert required == {"CPU": CPU_SHARES["ASR"], "GPU": 0.8}
    states = asr_replica_states()
    log.info(f"ASR replicas: {states}")
    assert states == {"RUNNING": FAKE_GPUS, "STARTING": ASR_REPLICAS - FAKE_GPUS}
    # The one replica that cannot answer is that ASR replica: Ray has not started it.
    _, unplaced = ask_replicas()
    log.info(f"not placed: {unplaced}")
    assert len(unplaced) == 1 and unplaced[0].startswith("SERVE_REPLICA::hark#ASR#")
    # The CPUs would hold it; what is left of the GPUs (0.2 of one) would not.
    left = ray.available_resources()
    log.info(f"available: CPU {left.get('CPU')}, GPU {left.get('GPU')}")
    assert left.get("CPU", 0) >= CPU_SHARES["ASR"] and available["CPU"] >= CPU_SHARES["ASR"]
    assert round(left.get("GPU", 0), 3) == round(available["GPU"], 3) == 0.2
