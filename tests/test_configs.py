"""The shipped Serve configs are valid Ray Serve configs whose settings and deployments exist."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pipeline.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {"Ingress", "AudioFetch", "ASR", "Diarization", "Accounting", "Jobs"}


@pytest.mark.parametrize("path", ["serve_config.yaml", "cluster/serve_config.gpu.yaml", "cluster/serve_config.gpu-80gb.yaml", "cluster/serve_config.cluster.yaml"])
def test_serve_config_is_valid(path):
    config = yaml.safe_load((REPO / path).read_text())
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert {d["name"] for d in app["deployments"]} <= DEPLOYMENTS
    Settings.model_validate(app["args"]["settings"])


@pytest.mark.parametrize("path, card_gb", [("cluster/serve_config.gpu.yaml", 24), ("cluster/serve_config.gpu-80gb.yaml", 80)])
def test_gpu_config_fits_one_gpu_per_asr_replica_with_diarization_beside_it(path, card_gb):
    from pipeline.asr.sizing import vllm_sizing
    from pipeline.core.settings import Settings

    app = yaml.safe_load((REPO / path).read_text())["applications"][0]
    gpus = {d["name"]: d["ray_actor_options"].get("num_gpus", 0) for d in app["deployments"]}
    assert gpus["ASR"] + gpus["Diarization"] <= 1
    # vLLM's memory share is derived from the replica's GPU share, never past it.
    settings = Settings(**app["args"]["settings"]).asr
    sizing = vllm_sizing(settings, "cuda", gpus["ASR"])
    assert sizing.memory_utilization <= gpus["ASR"]
    # The arithmetic in the file's header: weights 3.1 GB + ~2-4 GB activations + 0.32 GB a window.
    kv_gb = sizing.memory_utilization * card_gb - 3.1 - (2 if card_gb < 40 else 4)
    assert sizing.max_num_seqs * 0.32 <= kv_gb * 1.05, (sizing, kv_gb)
    assert f"{sizing.memory_utilization * card_gb:.1f} GB" in (REPO / path).read_text()
    settings = Settings.model_validate(app["args"]["settings"])
    assert settings.asr.device == "cuda" and settings.diarization.device == "cuda"


# ---- the cluster: KubeRay RayService, `ray up`, images ------------------------------------------

def _rayservice() -> dict:
    return yaml.safe_load((REPO / "cluster/rayservice.yaml").read_text())


def _pod_groups(manifest: dict) -> dict[str, dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return groups


def test_rayservice_serves_the_cluster_config_valid_for_ray_serve():
    from deployments.app import check_single_accounting

    served = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)  # Ray Serve's own schema, as KubeRay submits it
    # `ray up` + `serve deploy` and KubeRay deploy the same app.
    assert served == yaml.safe_load((REPO / "cluster/serve_config.cluster.yaml").read_text())
    [app] = served["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert {d["name"] for d in app["deployments"]} == DEPLOYMENTS
    settings = Settings.model_validate(app["args"]["settings"])
    assert settings.asr.device == "cuda" and settings.database_url is None  # secrets come from the Secret
    [accounting] = [d for d in app["deployments"] if d["name"] == "Accounting"]
    check_single_accounting(accounting)


@pytest.mark.parametrize("path", ["serve_config.yaml", "cluster/serve_config.gpu.yaml", "cluster/serve_config.gpu-80gb.yaml", "cluster/serve_config.cluster.yaml"])
def test_every_node_runs_a_proxy(path):
    assert yaml.safe_load((REPO / path).read_text())["proxy_location"] == "EveryNode"


def test_rayservice_pods_get_the_secret_images_and_readiness():
    import ray

    manifest = _rayservice()
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    port = yaml.safe_load(manifest["spec"]["serveConfigV2"])["http_options"]["port"]
    groups = _pod_groups(manifest)
    assert set(groups) == {"head", "cpu", "gpu"}
    for name, group in groups.items():
        [container] = group["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "hark"}} in container["envFrom"], name
        assert {"containerPort": port, "name": "serve"} in container["ports"], name
        assert container["image"].endswith(":cuda" if name == "gpu" else ":cpu"), name
        if name == "head":
            # KubeRay submits the app only once the head is ready: its readiness cannot wait for the app.
            assert "readinessProbe" not in container
        else:
            assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port}, name
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_bake_the_bundled_model_on_the_clusters_ray(dockerfile):
    import ray

    text = (REPO / "cluster" / dockerfile).read_text()
    assert f"rayproject/ray:{ray.__version__}-py311-" in text
    assert "HARK_ASR__MODEL_CACHE_DIR=" in text and "RUN hark models whisper-base" in text


def test_ray_up_config_is_valid_and_every_node_starts_with_the_settings():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster/ray-up.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's cluster-launcher schema, after its own defaults
    assert set(config["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}
    for command in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert command.startswith("set -a && . /home/ray/hark-secrets/hark.env && set +a &&") and "ray start" in command
    assert config["file_mounts"]["/home/ray/hark-cluster"] == "./cluster"  # serve deploy's config travels with it


def test_lean_keeps_the_actor_options_and_a_hook_already_set():
    from deployments.lean import lean

    options = lean({"num_cpus": 0.1, "runtime_env": {"env_vars": {"A": "1"}, "pip": ["x"]}})
    assert options["num_cpus"] == 0.1 and options["runtime_env"]["pip"] == ["x"]
    env = options["runtime_env"]["env_vars"]
    assert env == {"A": "1", "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": "deployments.lean.without_pandas"}
    theirs = {"runtime_env": {"env_vars": {"__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": "mine.hook"}}}
    assert lean(theirs) == theirs
    import ray._private.ray_constants as constants  # the name lean sets is Ray's

    assert constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR in env
