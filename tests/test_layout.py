"""Dependencies point one way: the HTTP side never loads the model libraries or Ray."""

import ast
import subprocess
import sys
from pathlib import Path


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(output.split())


def test_the_ingress_app_loads_no_torch_diffusers_transformers_or_ray():
    loaded = loaded_after_import("ourvidz_serve.api.app")
    assert not {"torch", "diffusers", "transformers", "ray"} & loaded


def test_code_that_needs_no_ray_does_not_import_it():
    for module in (
        "ourvidz_serve.pipelines.sdxl",
        "ourvidz_serve.storage.s3",
        "ourvidz_serve.persistence.repository",
        "ourvidz_serve.workers.worker",
        "ourvidz_serve.workers.handlers",
        "ourvidz_serve.security.fetch",
        "ourvidz_serve.security.prompt_policy",
        "ourvidz_serve.observability.exposition",
        "ourvidz_serve.cli",
    ):
        assert "ray" not in loaded_after_import(module), module


PACKAGE = Path(__file__).resolve().parents[1] / "ourvidz_serve"

# Who may not import whom: HTTP -> service -> repository / pipelines, never back.
FORBIDDEN = {
    "api": {"deployments"},
    "jobs": {"api", "deployments", "workers"},
    "workers": {"api", "deployments", "jobs"},
    "persistence": {"api", "deployments", "jobs", "workers", "pipelines", "storage"},
    "pipelines": {"api", "deployments", "jobs", "workers", "persistence", "storage"},
    "storage": {"api", "deployments", "jobs", "workers", "persistence", "pipelines"},
    "domain": {"api", "deployments", "jobs", "workers", "persistence", "pipelines", "storage"},
    "catalog": {"api", "deployments", "jobs", "workers", "persistence", "pipelines", "storage"},
    # Defences against hostile input are leaves: pure functions over bytes, URLs and text.
    "security": {"api", "deployments", "jobs", "workers", "persistence", "pipelines", "storage"},
    "redaction": {"api", "deployments", "jobs", "workers", "persistence", "pipelines", "storage"},
    # Metric families and their exposition: recorded by every layer, depending on none.
    "observability": {
        "api",
        "deployments",
        "jobs",
        "workers",
        "persistence",
        "pipelines",
        "storage",
        "cli",
    },
}


def imported_parts(path: Path) -> set[str]:
    """The top-level ``ourvidz_serve`` modules a file imports, at any depth."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("ourvidz_serve."):
                parts.add(name.split(".")[1])
    return parts


def test_dependencies_point_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        layer = relative.parts[0].removesuffix(".py")
        for imported in imported_parts(path) & FORBIDDEN.get(layer, set()):
            violations.append(f"{relative} imports ourvidz_serve.{imported}")
    assert violations == []
