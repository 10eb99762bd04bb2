"""The shipped Serve configs are valid Ray Serve configs whose settings and deployments exist."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pipeline.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {"Ingress", "AudioFetch", "ASR", "Diarization", "Accounting", "Jobs"}


@pytest.mark.parametrize("path", ["serve_config.yaml", "cluster/serve_config.gpu.yaml"])
def test_serve_config_is_valid(path):
    config = yaml.safe_load((REPO / path).read_text())
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert {d["name"] for d in app["deployments"]} <= DEPLOYMENTS
    Settings.model_validate(app["args"]["settings"])


def test_gpu_config_fits_one_gpu_per_asr_replica_with_diarization_beside_it():
    app = yaml.safe_load((REPO / "cluster/serve_config.gpu.yaml").read_text())["applications"][0]
    gpus = {d["name"]: d["ray_actor_options"].get("num_gpus", 0) for d in app["deployments"]}
    assert gpus["ASR"] + gpus["Diarization"] <= 1
    settings = Settings.model_validate(app["args"]["settings"])
    assert settings.asr.device == "cuda" and settings.diarization.device == "cuda"
