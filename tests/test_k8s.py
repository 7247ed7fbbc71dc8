"""KubeRay manifests: valid against the RayService CRD and serving a config from deployments/."""

from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "k8s" / "crds" / "ray.io_rayservices.yaml"


def rayservice_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_rayservice_serve_config_is_identical_to_the_ada_deployment_config():
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / "deployments" / "ada-48gb.yaml").read_text())


def test_rayservice_validates_against_the_kuberay_crd():
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    jsonschema.validate(service, rayservice_schema())


def test_every_serve_config_names_the_builder_and_sizes_every_deployment():
    configs = [REPO / "serve_config.yaml", *sorted((REPO / "deployments").glob("*.yaml"))]
    assert len(configs) >= 4
    for path in configs:
        config = yaml.safe_load(path.read_text())
        [app] = config["applications"]
        assert app["import_path"] == "ourvidz_serve.deployments.app:build_app", path
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == {"Ingress", "SDXL", "WAN", "Enhancer"}, path
        assert all("max_ongoing_requests" in d for d in deployments.values()), path
        assert deployments["Ingress"]["max_ongoing_requests"] > 5, path
        for name in ("SDXL", "WAN"):
            # The worker's shutdown grace (15 s by default) must fit in Serve's.
            assert deployments[name]["graceful_shutdown_timeout_s"] > 15, (path, name)


def most_replicas(deployment: dict) -> int:
    autoscaling = deployment.get("autoscaling_config")
    return int(autoscaling["max_replicas"] if autoscaling else deployment["num_replicas"])


def test_the_cpu_config_fits_every_replica_on_two_cpus_even_when_scaled_up():
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    deployments = config["applications"][0]["deployments"]
    assert sum(d["ray_actor_options"]["num_cpus"] * most_replicas(d) for d in deployments) <= 2
    assert all(d["ray_actor_options"]["num_cpus"] < 1 for d in deployments)


def test_every_serve_config_is_a_valid_ray_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    for path in [REPO / "serve_config.yaml", *sorted((REPO / "deployments").glob("*.yaml"))]:
        ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def test_the_cluster_can_grow_gpu_nodes_for_the_replicas_the_backlog_asks_for():
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    [gpu_group] = cluster["workerGroupSpecs"]
    assert gpu_group["maxReplicas"] > gpu_group["minReplicas"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    deployments = {d["name"]: d for d in serve_config["applications"][0]["deployments"]}
    for name in ("SDXL", "WAN"):
        policy = deployments[name]["autoscaling_config"]["policy"]
        assert policy["policy_function"].endswith(":BacklogAutoscalingPolicy")
