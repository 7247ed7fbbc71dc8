"""KubeRay manifests: rendered from a deployments/ profile, valid for the API server, wired up.

Validation, all offline:

- the RayService against KubeRay's CRD (k8s/crds/), with unknown fields refused as the API
  server does under strict field validation (kubectl's default since Kubernetes 1.27);
- its head and worker pod templates, and every core object under k8s/, with
  kubernetes-validate's strict schemas (unknown fields refused) for the oldest and the newest
  Kubernetes release it ships;
- the PodMonitors with the prometheus-operator models of cloudcoil-models-prometheus-operator
  (generated from prometheus-operator's CRDs); a field the models drop is an unknown field.

Then what no schema knows: which pods the monitors select (KubeRay's pod labels) and whether
those pods have the ports, Secrets and settings everything refers to.
"""

from __future__ import annotations

import copy
import os
import shutil
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from fastapi import APIRouter
from fastapi.routing import APIRoute
from kubernetes_validate.utils import all_versions
from typer.testing import CliRunner

from ourvidz_serve.api.dependencies import require_principal
from ourvidz_serve.api.metrics import router as metrics_router
from ourvidz_serve.api.routes import router as routes_router
from ourvidz_serve.cli import app
from ourvidz_serve.cli.kuberay import (
    DEFAULT_OUTPUT,
    DEFAULT_PROFILE,
    DEFAULT_TEMPLATE,
    MARKER,
    RenderError,
    render_rayservice,
)
from ourvidz_serve.settings import Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD = K8S / "crds" / "ray.io_rayservices.yaml"
RAYSERVICE = K8S / "rayservice.yaml"
TEMPLATE = K8S / "rayservice.template.yaml"
ADA = REPO / "deployments" / "ada-48gb.yaml"
MONITORING = K8S / "monitoring.yaml"
# The oldest and the newest Kubernetes release kubernetes-validate has schemas for.
KUBERNETES_VERSIONS = (all_versions()[0], all_versions()[-1])
# KubeRay's ray.io/group value for the head pod (utils.RayNodeHeadGroupLabelValue).
HEAD_GROUP = "headgroup"

runner = CliRunner()
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=Loader)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]


def rayservice() -> dict[str, Any]:
    return load(RAYSERVICE)


def by_name(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects}


def secrets() -> dict[str, dict[str, Any]]:
    found = [d for p in sorted(K8S.glob("*.yaml")) for d in documents(p) if d["kind"] == "Secret"]
    return by_name(found)


def serve_deployments(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [application] = config["applications"]
    return {d["name"]: d for d in application["deployments"]}


# --- validators ---------------------------------------------------------------------------


def strict_structural(schema: Any) -> Any:
    """A CRD's schema as the API server applies it under strict field validation: an object
    that lists its properties accepts no other field, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: strict_structural(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@cache
def rayservice_validator() -> jsonschema.Draft7Validator:
    crd = load(CRD)
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_structural(version["schema"]["openAPIV3Schema"]))


def validate_rayservice(service: dict[str, Any]) -> None:
    rayservice_validator().validate(service)


def validate_core(manifest: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def pod_templates(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name (KubeRay's ray.io/group) to that group's pod template."""
    cluster = service["spec"]["rayClusterConfig"]
    templates = {HEAD_GROUP: cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def validate_pod_template(name: str, template: dict[str, Any]) -> None:
    """A pod template as a core PodTemplate object (its ``template`` is a PodTemplateSpec)."""
    validate_core(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
    )


def validate_monitor(monitor: dict[str, Any]) -> None:
    """Against prometheus-operator's models; a field they do not know is an error."""
    model = getattr(prometheus_operator, monitor["kind"])
    parsed = model.model_validate(monitor).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    if parsed != monitor:
        raise ValueError(f"fields prometheus-operator does not know: {monitor} read as {parsed}")


# --- rendering -----------------------------------------------------------------------------


def test_rendering_the_template_with_the_ada_profile_reproduces_the_committed_manifest():
    rendered = render_rayservice(
        TEMPLATE.read_text(),
        ADA.read_text(),
        template_name="k8s/rayservice.template.yaml",
        profile_name="deployments/ada-48gb.yaml",
    )
    assert rendered.encode() == RAYSERVICE.read_bytes()
    assert (DEFAULT_TEMPLATE, DEFAULT_PROFILE, DEFAULT_OUTPUT) == (
        TEMPLATE.relative_to(REPO),
        ADA.relative_to(REPO),
        RAYSERVICE.relative_to(REPO),
    )


def test_the_rayservice_serves_the_ada_profile_verbatim_comments_included():
    embedded = rayservice()["spec"]["serveConfigV2"]
    assert embedded == ADA.read_text()
    assert yaml.safe_load(embedded) == load(ADA)
    assert "# Memory plan" in embedded


def test_the_cli_check_accepts_the_committed_manifest(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["render-rayservice", "--check"])
    assert result.exit_code == 0, result.output
    assert "k8s/rayservice.yaml is up to date" in result.output


@pytest.fixture
def render_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    template, profile = tmp_path / "template.yaml", tmp_path / "profile.yaml"
    shutil.copy(TEMPLATE, template)
    shutil.copy(ADA, profile)
    return template, profile, tmp_path / "out" / "rayservice.yaml"


def render_args(inputs: tuple[Path, Path, Path], *extra: str) -> list[str]:
    template, profile, output = inputs
    return [
        "render-rayservice",
        "--template",
        str(template),
        "--profile",
        str(profile),
        "--output",
        str(output),
        *extra,
    ]


def test_render_writes_a_manifest_that_check_then_accepts(render_inputs):
    _, profile, output = render_inputs
    profile.write_text(profile.read_text().replace("max_replicas: 4", "max_replicas: 3"))
    result = runner.invoke(app, render_args(render_inputs))
    assert result.exit_code == 0, result.output
    written = load(output)
    assert written["spec"]["serveConfigV2"] == profile.read_text()
    assert runner.invoke(app, render_args(render_inputs, "--check")).exit_code == 0


def test_render_check_fails_on_a_drifted_manifest_with_a_clear_message(render_inputs):
    _, profile, output = render_inputs
    assert runner.invoke(app, render_args(render_inputs)).exit_code == 0
    # The profile changes after rendering: the manifest no longer serves it.
    profile.write_text(profile.read_text().replace("units_per_replica: 6", "units_per_replica: 12"))
    before = output.read_bytes()
    result = runner.invoke(app, render_args(render_inputs, "--check"))
    assert result.exit_code == 1
    assert "is out of date" in result.output
    assert "render-rayservice" in result.output  # what to run about it
    diff = [line.replace(" ", "") for line in result.output.splitlines()]
    assert "-units_per_replica:6" in diff and "+units_per_replica:12" in diff  # what changed
    assert output.read_bytes() == before  # --check writes nothing
    # An edit of the rendered file itself is drift too.
    assert runner.invoke(app, render_args(render_inputs)).exit_code == 0
    output.write_text(output.read_text().replace("maxReplicas: 4", "maxReplicas: 8"))
    assert runner.invoke(app, render_args(render_inputs, "--check")).exit_code == 1
    output.unlink()
    missing = runner.invoke(app, render_args(render_inputs, "--check"))
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_render_refuses_a_template_without_one_marker_and_a_profile_that_is_not_serve(
    render_inputs,
):
    template, profile, output = render_inputs
    original = template.read_text()
    template.write_text(original.replace(MARKER, "{}"))
    result = runner.invoke(app, render_args(render_inputs))
    assert result.exit_code == 2 and "exactly one line" in result.output
    template.write_text(original + f"  # {MARKER}\n    {MARKER}\n")
    assert runner.invoke(app, render_args(render_inputs)).exit_code == 2
    template.write_text(original)
    profile.write_text(profile.read_text().replace("applications:", "aplications:"))
    result = runner.invoke(app, render_args(render_inputs))
    assert result.exit_code == 2 and "not a valid Ray Serve config" in result.output
    assert not output.exists()


def test_a_profile_that_would_not_survive_embedding_is_refused():
    template = TEMPLATE.read_text()
    for profile in (ADA.read_text().rstrip("\n"), ADA.read_text() + "\n"):
        with pytest.raises(RenderError, match="exactly one newline"):
            render_rayservice(template, profile, template_name="t", profile_name="p")
    # A marker that is not the whole block scalar: the text around it would be embedded too.
    wrapped = template.replace(f"    {MARKER}\n", f"    {MARKER}\n    extra: line\n")
    with pytest.raises(RenderError, match="verbatim"):
        render_rayservice(wrapped, ADA.read_text(), template_name="t", profile_name="p")


# --- schemas -------------------------------------------------------------------------------


def test_the_rayservice_validates_against_the_kuberay_crd_with_unknown_fields_refused():
    validate_rayservice(rayservice())


def test_the_crd_check_rejects_misspelled_and_mistyped_fields():
    service = rayservice()
    mutations = [
        ("spec", "serveConfigV3"),
        ("spec.rayClusterConfig", "enableInTreeAutoscalling"),
        ("spec.rayClusterConfig.workerGroupSpecs.0", "minReplica"),
        ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0", "envfrom"),
    ]
    for path, field in mutations:
        mutated = copy.deepcopy(service)
        node: Any = mutated
        for key in path.split("."):
            node = node[int(key)] if key.isdigit() else node[key]
        node[field] = node.get(field, True)
        with pytest.raises(jsonschema.ValidationError, match=field):
            validate_rayservice(mutated)
    mistyped = copy.deepcopy(service)
    mistyped["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        validate_rayservice(mistyped)


def test_the_head_and_worker_pod_templates_are_valid_kubernetes_pod_templates():
    templates = pod_templates(rayservice())
    assert set(templates) == {HEAD_GROUP, "ada-48gb"}
    for name, template in templates.items():
        validate_pod_template(name, template)


def test_kubernetes_validate_rejects_a_misspelled_field_in_a_pod_template():
    template = copy.deepcopy(pod_templates(rayservice())["ada-48gb"])
    template["spec"]["containers"][0]["readinesProbe"] = template["spec"]["containers"][0].pop(
        "readinessProbe"
    )
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate_pod_template("ada-48gb", template)
    template = copy.deepcopy(pod_templates(rayservice())["ada-48gb"])
    template["spec"]["volumes"][0]["persistentVolumeClaim"]["claimname"] = "ourvidz-models"
    with pytest.raises(kubernetes_validate.ValidationError, match="claimname"):
        validate_pod_template("ada-48gb", template)


def test_every_manifest_under_k8s_validates_with_the_schema_of_its_kind():
    """Core objects with kubernetes-validate, the RayService with the CRD, the monitors with
    prometheus-operator's models: no object under k8s/ goes unchecked."""
    kinds = set()
    for path in sorted(K8S.glob("*.yaml")):
        if path == TEMPLATE:
            continue  # its rendering, k8s/rayservice.yaml, is checked
        for manifest in documents(path):
            kinds.add(manifest["kind"])
            group = manifest["apiVersion"].rpartition("/")[0]
            if group == "ray.io":
                validate_rayservice(manifest)
            elif group == "monitoring.coreos.com":
                validate_monitor(manifest)
            else:
                validate_core(manifest)
    assert kinds == {"RayService", "PodMonitor", "Secret", "PersistentVolumeClaim", "Pod"}


def test_kubernetes_validate_rejects_a_misspelled_field_in_a_core_object():
    secret = secrets()["ourvidz-serve"]
    validate_core(secret)
    misspelled = {**secret, "stringdata": secret["stringData"]}
    del misspelled["stringData"]
    with pytest.raises(kubernetes_validate.ValidationError, match="stringdata"):
        validate_core(misspelled)


def test_the_monitor_check_rejects_unknown_and_mistyped_fields():
    monitors = by_name(documents(MONITORING))
    ray_monitor, ingress_monitor = monitors["ourvidz-serve-ray"], monitors["ourvidz-serve-ingress"]
    validate_monitor(ingress_monitor)
    unknown = copy.deepcopy(ray_monitor)
    unknown["spec"]["podMetricsEndpoint"] = unknown["spec"].pop("podMetricsEndpoints")
    with pytest.raises(ValueError, match="does not know"):
        validate_monitor(unknown)
    nested = copy.deepcopy(ingress_monitor)
    nested["spec"]["podMetricsEndpoints"][0]["authorization"]["credential"] = {"name": "x"}
    with pytest.raises(ValueError, match="does not know"):
        validate_monitor(nested)
    mistyped = copy.deepcopy(ingress_monitor)
    mistyped["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"] = "token"
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        validate_monitor(mistyped)


# --- what the schemas do not know ------------------------------------------------------------


def kuberay_pod_labels(template: dict[str, Any], node_type: str, group: str) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod (ray-operator/controllers/ray/common/pod.go,
    labelPod): the template's, and these, which a template cannot override."""
    return {
        **template.get("metadata", {}).get("labels", {}),
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "ray.io/cluster": "ourvidz-serve-x7k2p",  # RayService clusters get a generated name
        "ray.io/is-ray-node": "yes",
    }


def ray_pods(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name to (labels, Ray container) as KubeRay creates that group's pods."""
    pods = {}
    for group, template in pod_templates(service).items():
        node_type = "head" if group == HEAD_GROUP else "worker"
        pods[group] = {
            "labels": kuberay_pod_labels(template, node_type, group),
            # KubeRay's Ray container is the first (utils.RayContainerIndex).
            "container": template["spec"]["containers"][0],
        }
    return pods


def dependencies(router: APIRouter, path: str) -> set[Any]:
    """What FastAPI calls before the route's handler (e.g. the credential check)."""
    [route] = [r for r in router.routes if isinstance(r, APIRoute) and r.path == path]
    return {dependency.call for dependency in route.dependant.dependencies}


def port_named(container: dict[str, Any], name: str) -> int:
    [port] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    return int(port)


def selected(monitor: dict[str, Any], pods: dict[str, dict[str, Any]]) -> set[str]:
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, "only matchLabels is modelled here"
    wanted = selector["matchLabels"].items()
    return {group for group, pod in pods.items() if wanted <= pod["labels"].items()}


def test_the_ray_monitor_scrapes_every_ray_pod_on_its_metrics_export_port():
    service = rayservice()
    monitors = by_name(documents(MONITORING))
    pods = ray_pods(service)
    ray_monitor = monitors["ourvidz-serve-ray"]
    assert selected(ray_monitor, pods) == set(pods)  # the head and every worker group
    [endpoint] = ray_monitor["spec"]["podMetricsEndpoints"]
    cluster = service["spec"]["rayClusterConfig"]
    start_params = [cluster["headGroupSpec"]["rayStartParams"]] + [
        g["rayStartParams"] for g in cluster["workerGroupSpecs"]
    ]
    # Set explicitly (not left to KubeRay's default) and the same port the monitor names.
    assert all(p["metrics-export-port"] == "8080" for p in start_params)
    for group, pod in pods.items():
        assert port_named(pod["container"], endpoint["port"]) == 8080, group
    assert set(ray_monitor["spec"]["podTargetLabels"]) <= set(pods[HEAD_GROUP]["labels"])


def test_the_ingress_monitor_scrapes_get_metrics_once_through_the_heads_serve_proxy():
    service = rayservice()
    monitor = by_name(documents(MONITORING))["ourvidz-serve-ingress"]
    pods = ray_pods(service)
    # GET /metrics reports the whole cluster: one target, or every series would be repeated.
    assert selected(monitor, pods) == {HEAD_GROUP}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    http_port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    assert port_named(pods[HEAD_GROUP]["container"], endpoint["port"]) == http_port
    assert require_principal in dependencies(metrics_router, "/metrics")  # a bearer token


def test_the_ingress_scrape_sends_a_key_the_service_accepts():
    monitor = by_name(documents(MONITORING))["ourvidz-serve-ingress"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    authorization = endpoint["authorization"]
    assert authorization["type"] == "Bearer"
    credentials = authorization["credentials"]
    token = secrets()[credentials["name"]]["stringData"][credentials["key"]]
    settings = secrets()["ourvidz-serve"]["stringData"]
    assert token in Settings(api_keys=settings["OURVIDZ_API_KEYS"]).api_keys


def test_the_cluster_settings_use_an_external_postgresql_and_s3(monkeypatch: pytest.MonkeyPatch):
    service = rayservice()
    settings_secret = secrets()["ourvidz-serve"]
    for pod in ray_pods(service).values():
        refs = [e["secretRef"]["name"] for e in pod["container"]["envFrom"] if "secretRef" in e]
        assert refs == ["ourvidz-serve"]
    for name in [n for n in os.environ if n.startswith("OURVIDZ_")]:
        monkeypatch.delenv(name)
    for name, value in settings_secret["stringData"].items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.node_local_state() == []
    settings.check_cluster_size(
        1 + max(g["maxReplicas"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    )
    for model in ("sdxl_checkpoint", "wan_model_dir", "qwen_model_dir"):
        assert str(getattr(settings, model)).startswith("/models/"), model


def test_ray_token_auth_reads_a_secret_that_is_provided():
    options = rayservice()["spec"]["rayClusterConfig"]["authOptions"]
    assert options["mode"] == "token"
    # KubeRay reads the token from the key auth_token (utils.RAY_AUTH_TOKEN_SECRET_KEY).
    assert secrets()[options["secretName"]]["stringData"]["auth_token"]


def test_the_weights_are_the_claims_volume_mounted_read_only_at_models():
    service = rayservice()
    claims = by_name(
        [
            d
            for p in K8S.glob("*.yaml")
            for d in documents(p)
            if d["kind"] == "PersistentVolumeClaim"
        ]
    )
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        # Every GPU worker mounts it at once: a claim many nodes can attach.
        assert set(claims[claim["claimName"]]["spec"]["accessModes"]) & {
            "ReadWriteMany",
            "ReadOnlyMany",
        }


def test_every_image_is_the_package_version_and_ray_is_the_pinned_one():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = [
        c["image"]
        for path in sorted(K8S.glob("*.yaml"))
        for doc in documents(path)
        for spec in _pod_specs(doc)
        for c in spec["containers"]
    ]
    assert len(images) >= 3
    assert set(images) == {f"ourvidz-serve:{version}"}
    service = rayservice()
    assert service["metadata"]["labels"]["app.kubernetes.io/version"] == version
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    if doc["kind"] == "RayService":
        return [t["spec"] for t in pod_templates(doc).values()]
    return []


def test_the_head_holds_no_replica_and_the_first_gpu_worker_holds_one_of_each():
    service = rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in name for part in head_resources.values() for name in part)
    deployments = serve_deployments(service)
    # A replica asking for no CPU could land on the head; every one asks for some.
    assert all(d["ray_actor_options"]["num_cpus"] > 0 for d in deployments.values())
    [group] = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert limits == requests  # a GPU node is not overcommitted
    assert group["minReplicas"] >= 1

    def fewest(d: dict[str, Any]) -> int:
        autoscaling = d.get("autoscaling_config")
        return int(autoscaling["min_replicas"] if autoscaling else d["num_replicas"])

    cpus = sum(d["ray_actor_options"]["num_cpus"] * fewest(d) for d in deployments.values())
    gpus = sum(d["ray_actor_options"].get("num_gpus", 0) * fewest(d) for d in deployments.values())
    assert cpus <= int(limits["cpu"])
    assert gpus <= int(limits["nvidia.com/gpu"])


def test_the_cluster_can_grow_gpu_nodes_for_the_replicas_the_backlog_asks_for():
    service = rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    [gpu_group] = cluster["workerGroupSpecs"]
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] < gpu_group["maxReplicas"]
    assert (
        int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        >= 1
    )
    deployments = serve_deployments(service)
    for name in ("SDXL", "WAN"):
        autoscaling = deployments[name]["autoscaling_config"]
        assert autoscaling["policy"]["policy_function"].endswith(":BacklogAutoscalingPolicy")
        assert autoscaling["max_replicas"] > autoscaling["min_replicas"]


def test_workers_are_ready_when_their_proxy_and_the_apps_healthz_answer():
    service = rayservice()
    pods = ray_pods(service)
    http_port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    for group, pod in pods.items():
        container = pod["container"]
        # Liveness stays KubeRay's (the raylet's health): an app check would restart workers
        # while the models load.
        assert "livenessProbe" not in container, group
        if group == HEAD_GROUP:
            # KubeRay deploys the app once the head is ready: a probe on the app would wait
            # forever.
            assert "readinessProbe" not in container
            continue
        command = " ".join(container["readinessProbe"]["exec"]["command"])
        assert port_named(container, "serve") == http_port
        assert f"http://localhost:{http_port}/-/healthz" in command  # Serve's proxy, drain-aware
        assert f"http://localhost:{http_port}/healthz" in command  # the app's Ingress
    # GET /healthz needs no credential (a probe has none); /readyz does.
    assert dependencies(routes_router, "/healthz") == set()
    assert require_principal in dependencies(routes_router, "/readyz")
    assert service["spec"]["excludeHeadPodFromServeSvc"] is True


def test_every_serve_config_names_the_builder_and_sizes_every_deployment():
    configs = [REPO / "serve_config.yaml", *sorted((REPO / "deployments").glob("*.yaml"))]
    assert len(configs) >= 4
    for path in configs:
        config = yaml.safe_load(path.read_text())
        [app_config] = config["applications"]
        assert app_config["import_path"] == "ourvidz_serve.deployments.app:build_app", path
        deployments = {d["name"]: d for d in app_config["deployments"]}
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
