"""infra/: every YAML parses and agrees with the CLI and the Serve app (tests/cluster submits the DAG with a real
`ray job submit` to a 2-node cluster)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_config

ROOT = Path(__file__).parents[2]
INFRA = ROOT / "infra"
IMAGE = "diffusion-pipeline:0.1.0"  # pinned: the manifests, the launcher and the Dockerfile's build line agree


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _check_cli_command(cmd: str) -> None:
    """A `diffusion-pipeline run --config X ...` command line: the command exists and its config validates."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["diffusion-pipeline", "run"], cmd
    cfg_path = ROOT / argv[argv.index("--config") + 1]
    load_config(cfg_path)


def test_every_infra_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {f.name for f in files} >= {"cluster.yaml", "rayjob.yaml", "rayservice.yaml", "docker-compose.yaml"}
    for f in files:
        assert isinstance(_load(f), dict), f


def test_rayjob_runs_the_pipeline_cli():
    job = _load(INFRA / "k8s" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _check_cli_command(job["spec"]["entrypoint"])
    spec = job["spec"]["rayClusterSpec"]
    images = [c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    images += [c["image"] for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert set(images) == {IMAGE}


def test_rayservice_imports_the_serve_app(monkeypatch):
    import importlib

    from ray.serve import Application

    svc = _load(INFRA / "k8s" / "rayservice.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    module, attr = apps[0]["import_path"].split(":")
    for k, v in apps[0]["runtime_env"]["env_vars"].items():
        monkeypatch.setenv(k, str(ROOT / v) if k == "DIFFUSION_PIPELINE_CONFIG" else v)
    # what KubeRay does: import the module, take the attribute (the app is built from the env config)
    assert isinstance(getattr(importlib.import_module(module), attr), Application)


def test_cluster_launcher_and_dockerfile_agree():
    cluster = _load(INFRA / "ray" / "cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands"):
        assert key in cluster
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["docker"]["image"] == IMAGE
    docker = (INFRA / "docker" / "Dockerfile").read_text()
    assert "-c constraints.txt" in docker and "diffusion-pipeline" in docker
    for path in ("pyproject.toml", "constraints.txt", "diffusion_core", "pipelines", "configs"):
        assert f"COPY {path}" in docker or f" {path}" in docker


def test_mlflow_server_has_postgres_and_object_store():
    compose = _load(INFRA / "mlflow" / "docker-compose.yaml")["services"]
    cmd = compose["mlflow"]["command"]
    assert "\n" not in cmd.strip()  # one shell line (a folded block with deeper lines would keep newlines)
    assert re.search(r"--backend-store-uri postgresql(\+psycopg2)?://", cmd) and "--artifacts-destination s3://" in cmd
    assert compose["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def _ray_containers(cluster_spec: dict) -> list[dict]:
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    return head + [c for g in cluster_spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name,spec_key", [("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")])
def test_manifests_turn_token_auth_on_with_the_token_in_a_secret(name, spec_key):
    doc = _load(INFRA / "k8s" / name)
    containers = _ray_containers(doc["spec"][spec_key])
    if name == "rayjob.yaml":  # the submitter talks to the job API, so it needs the token too
        containers += doc["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert "value" not in env["RAY_AUTH_TOKEN"], c["name"]  # never a literal token in the manifest
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token", c["name"]
    head = doc["spec"][spec_key]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})


def test_the_manifests_tracking_uri_is_the_one_in_force():
    """cluster_example.yaml leaves registry.tracking_uri unset, so the manifests' MLFLOW_TRACKING_URI wins."""
    cfg = load_config(ROOT / "configs" / "cluster_example.yaml")
    assert cfg.registry.tracking_uri is None
    job = _load(INFRA / "k8s" / "rayjob.yaml")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    assert cfg.workspace.store and cfg.workspace.store.startswith("s3://")  # records on the shared store
    assert cfg.train.storage_path.startswith("s3://")


def test_cluster_launcher_gives_the_head_no_gpu_and_turns_token_auth_on():
    cluster = _load(INFRA / "ray" / "cluster.yaml")
    docker = cluster["docker"]
    assert not any("--gpus" in o for o in docker["run_options"] + docker["head_run_options"])
    assert any("--gpus" in o for o in docker["worker_run_options"])
    head_type = cluster["available_node_types"][cluster["head_node_type"]]
    assert head_type["resources"].get("GPU", 0) == 0
    head_start = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    worker_start = [c for c in cluster["worker_start_ray_commands"] if "ray start" in c]
    assert head_start and all("RAY_AUTH_MODE=token" in c and "--num-gpus=0" in c for c in head_start)
    assert worker_start and all("RAY_AUTH_MODE=token" in c for c in worker_start)
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_dockerfile_runs_as_non_root_with_wget_and_a_pinned_base():
    lines = [ln.strip() for ln in (INFRA / "docker" / "Dockerfile").read_text().splitlines()]
    base = next(ln for ln in lines if ln.startswith("FROM "))
    assert ":" in base and not base.endswith(":latest")
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    text = "\n".join(lines)
    assert "wget" in text and "awscli" not in text  # probes need wget; object storage goes through pyarrow.fs


def test_mlflow_compose_has_no_default_passwords_and_pinned_images():
    doc = _load(INFRA / "mlflow" / "docker-compose.yaml")
    for name, svc in doc["services"].items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), name
        for key, value in (svc.get("environment") or {}).items():
            if any(w in key for w in ("PASSWORD", "SECRET", "ROOT_USER")):
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), (name, key)
    assert "PASS" not in doc["services"]["mlflow"]["command"].split("--backend-store-uri")[1].split()[0].upper()
    assert all("file" in s for s in doc["secrets"].values())
