"""Deployment files against the tools' own schemas: Ray Serve's deploy schema for serve/config.yaml and the
RayService's serveConfigV2, the Ray cluster launcher's preparation and validation for cluster.yaml, and the
KubeRay manifests' wiring (config, secret, GPU workers, the CLI they call)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from embray.cli import cli
from embray.config import parse_config

from .helpers import REPO, make_config

READYZ_APP = "embray-readyz"

KUBERAY = REPO / "deploy" / "kuberay"


def _yaml(path):
    return yaml.safe_load(path.read_text())


def test_serve_config_is_accepted_by_serves_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_yaml(REPO / "serve" / "config.yaml"))
    app, ready = schema.applications
    assert app.import_path == "embray.serving:build" and "working_dir" not in (app.runtime_env or {})
    assert (ready.name, ready.route_prefix, ready.args) == (READYZ_APP, "/readyz", {"app": app.name})


def test_the_sharded_serve_config_names_the_deployments_the_builder_makes():
    """serve/config-sharded.yaml overrides, by name, the deployments `application` makes for shard_groups 4."""
    from ray.serve.schema import ServeDeploySchema

    from embray.serving import application

    schema = ServeDeploySchema.model_validate(_yaml(REPO / "serve" / "config-sharded.yaml"))
    app, ready = schema.applications
    assert ready.import_path == "embray.serving:readyz" and ready.route_prefix == "/readyz"
    assert app.import_path == "embray.serving:build"
    built = application(make_config(Path("/tmp/unused"), serve={"shard_groups": 4, "group_replicas": 2}))
    made = {built._bound_deployment.name} | {g._bound_deployment.name for g in built._bound_deployment.init_args[1]}
    assert {d.name for d in app.deployments} == made == {"EmbrayServer"} | {f"EmbrayShardGroup{g}" for g in range(4)}


def test_the_rayservice_serves_the_same_application_as_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = _yaml(KUBERAY / "rayservice.yaml")
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded["applications"] == _yaml(REPO / "serve" / "config.yaml")["applications"]


def test_the_builder_import_path_resolves_to_the_serve_application():
    from ray.serve._private.utils import import_attr

    from embray.serving import build, readyz

    app, ready = _yaml(REPO / "serve" / "config.yaml")["applications"]
    assert import_attr(app["import_path"]) is build and import_attr(ready["import_path"]) is readyz


def test_serve_pods_are_ready_only_while_embray_answers_and_the_probe_cannot_hang():
    """The Serve workers' readiness probe is /readyz (answered by the embray-readyz application in every state)
    with a timeout; the head has none of its own (KubeRay deploys the Serve config only once the head is ready)."""
    spec = _yaml(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]
    assert "readinessProbe" not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    [cpu] = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu"]
    probe = cpu["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/readyz", "port": 8000} and 1 <= probe["timeoutSeconds"] <= 2


def test_cluster_yaml_passes_the_cluster_launchers_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_yaml(REPO / "cluster.yaml"))
    validate_config(config)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert any("/etc/embray/embray.yaml" in c for c in config["setup_commands"])


def _pods(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec")
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob-backfill.yaml"])
def test_every_ray_pod_mounts_the_config_and_gpu_groups_ask_for_gpus(name):
    doc = _yaml(KUBERAY / name)
    for pod in _pods(doc):
        [container] = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/etc/embray"] == "embray-config"
        assert {"name": "embray-config", "configMap": {"name": "embray-config"}} in pod["volumes"]
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec")
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_admin_token_comes_from_a_kubernetes_secret():
    for pod in _pods(_yaml(KUBERAY / "rayservice.yaml")):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["EMBRAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "embray-admin", "key": "token"}
        assert "value" not in env["EMBRAY_ADMIN_TOKEN"]


def test_the_configmap_holds_a_valid_embray_config():
    [doc] = list(yaml.safe_load_all((KUBERAY / "config.yaml").read_text()))
    cfg = parse_config(yaml.safe_load(doc["data"]["embray.yaml"]))
    assert cfg.store.uri.startswith("s3://") and cfg.mlflow.tracking_uri.startswith("http")
    assert cfg.embed.num_gpus == 1 and cfg.model.precision == "fp16"


def _cli_args(argv: list[str]) -> None:
    """Parse (not run) an embray command line the manifests use, as the CLI would."""
    assert argv[0] == "embray"
    command = cli.commands[argv[1]]
    ctx = command.make_context(argv[1], list(argv[2:]), resilient_parsing=False)
    assert ctx.params["config_path"] == "/etc/embray/embray.yaml"


def test_the_manifests_call_real_cli_commands():
    _cli_args(shlex.split(_yaml(KUBERAY / "rayjob-backfill.yaml")["spec"]["entrypoint"]))
    command = _yaml(KUBERAY / "cronjob-monitor.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    argv = command["containers"][0]["command"]
    assert argv[:3] == ["ray", "job", "submit"]
    _cli_args(argv[argv.index("--") + 1 :])
