"""Dependencies point one way: the HTTP side never loads the model libraries or Ray."""

import subprocess
import sys


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
    ):
        assert "ray" not in loaded_after_import(module), module
