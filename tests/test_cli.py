"""The ``ourvidz-serve`` command line: ``plan`` exit codes, errors and output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ourvidz_serve.cli import app

REPO = Path(__file__).resolve().parents[1]
ADA = REPO / "deployments" / "ada-48gb.yaml"
runner = CliRunner()


def test_help_lists_the_plan_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "plan" in result.output
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0
    assert "--gpu-memory-gib" in result.output and "--json" in result.output


def test_the_installed_script_answers_help():
    script = Path(sys.executable).with_name("ourvidz-serve")
    if not script.exists():
        pytest.skip("the package is not installed with its script (pip install -e .)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "plan" in result.stdout


@pytest.mark.parametrize("name", ["ada-48gb", "h100-80gb", "split-gpus"])
def test_the_hardware_profiles_fit(name):
    result = runner.invoke(app, ["plan", str(REPO / "deployments" / f"{name}.yaml")])
    assert result.exit_code == 0, result.output
    for deployment in ("SDXL", "WAN", "Enhancer", "Per GPU"):
        assert deployment in result.output
    assert "fits" in result.output


def test_json_output_parses():
    result = runner.invoke(app, ["plan", str(ADA), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["fits"] is True and plan["problems"] == []
    assert plan["gpu_memory_gib"] == 47.5
    by_name = {d["name"]: d for d in plan["deployments"]}
    assert by_name["Ingress"]["need"] is None
    sdxl = by_name["SDXL"]["need"]
    assert {w["name"] for w in sdxl["weights"]} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert sdxl["total_bytes"] <= by_name["SDXL"]["share_bytes"]
    [gpu] = plan["gpus"]
    assert gpu["replicas"] == ["SDXL#1", "WAN#1", "Enhancer#1"] and gpu["fits"] is True


def test_a_smaller_gpu_than_planned_does_not_fit():
    result = runner.invoke(app, ["plan", str(ADA), "--gpu-memory-gib", "24"])
    assert result.exit_code == 1
    assert "does not fit" in result.output
    assert "NO" in result.output


def test_an_over_full_profile_exits_1(tmp_path):
    document = yaml.safe_load(ADA.read_text())
    for deployment in document["applications"][0]["deployments"]:
        if deployment["name"] != "Ingress":
            deployment["ray_actor_options"]["num_gpus"] = 0.3  # Qwen needs more than 14.2 GiB
    path = tmp_path / "over-full.yaml"
    path.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 1
    plan = json.loads(result.stdout)
    assert plan["fits"] is False
    assert any(p.startswith("Enhancer: a replica needs") for p in plan["problems"])


def test_a_missing_file_is_a_friendly_error():
    result = runner.invoke(app, ["plan", "deployments/no-such-profile.yaml"])
    assert result.exit_code == 2
    assert "error: deployments/no-such-profile.yaml: no such file" in result.output
    assert "Traceback" not in result.output


def test_bad_yaml_and_unknown_deployments_are_friendly_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n")
    result = runner.invoke(app, ["plan", str(broken)])
    assert result.exit_code == 2 and "not valid YAML" in result.output

    document = yaml.safe_load(ADA.read_text())
    document["applications"][0]["deployments"][0]["name"] = "Gateway"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["plan", str(unknown)])
    assert result.exit_code == 2 and "unknown deployment 'Gateway'" in result.output


def test_a_gpu_profile_needs_a_gpu_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("OURVIDZ_GPU_MEMORY_GIB", raising=False)
    document = yaml.safe_load(ADA.read_text())
    del document["applications"][0]["args"]["gpu_memory_gib"]
    path = tmp_path / "no-memory.yaml"
    path.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2 and "--gpu-memory-gib" in result.output
    assert runner.invoke(app, ["plan", str(path), "--gpu-memory-gib", "47.5"]).exit_code == 0
