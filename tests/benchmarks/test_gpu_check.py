"""The GPU check's kit and scripts, checked here without a GPU or the network.

benchmarks/gpu_check.sh runs benchmarks/gpu_full_random.py on a GPU machine whose image
(benchmarks/device-image.txt) lacks some of what it imports; benchmarks/device-kit.txt lists
the wheels that make up the difference. These tests hold the kit to the imports (a new import
of a package the image lacks fails here, not in the GPU machine's few minutes), to .venv's
versions, and run the benchmark's bookkeeping: bounds, extrapolation and the report.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
KIT = BENCHMARKS / "device-kit.txt"
IMAGE = BENCHMARKS / "device-image.txt"
ENTRY = BENCHMARKS / "gpu_full_random.py"

# Where the kit's version is not .venv's, and why.
VENV_DIFFERS = {"imageio-ffmpeg": "the 0.8.1 wheel alone is over the 64 MiB a device call carries"}
# Declared by a kit package but never imported on the device's Python, and why.
DECLARED_NOT_IMPORTED = {"importlib-metadata": "diffusers imports it only on Python < 3.8"}
# In the kit though nothing imports it by name, and why.
IMPORTED_WHEN_PRESENT = {
    "peft": "diffusers and transformers import it whenever it is installed, and the image's "
    "version is unknown"
}
# The device: CPython 3.12 on x86-64 Linux, for the environment markers of Requires-Dist.
DEVICE_MARKERS: dict[str, str] = {
    **{key: str(value) for key, value in default_environment().items()},
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "implementation_name": "cpython",
}


def normal(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> dict[str, str | None]:
    """{name: version or None} of a file of `name` / `name==version` lines with # comments."""
    entries: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert normal(name) not in entries, f"{name} is listed twice in {path.name}"
        entries[normal(name)] = version or None
    return entries


def in_image(name: str, image: dict[str, str | None]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in image)


def module_file(name: str) -> Path | None:
    """The source of a first-party module: ourvidz_serve's, or a benchmark imported by name."""
    parts = name.split(".")
    base = ROOT if parts[0] == "ourvidz_serve" else BENCHMARKS
    for candidate in (
        base.joinpath(*parts).with_suffix(".py"),
        base.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


def imported_names(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module, names imported from it) of every absolute import, but those only for typing."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            stack += node.orelse
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [alias.name for alias in node.names]
        stack += ast.iter_child_nodes(node)


def third_party_imports(entry: Path) -> dict[str, set[str]]:
    """{top-level module: first-party files importing it} of everything ``entry`` can import,
    following the first-party modules (function-level imports included)."""
    found: dict[str, set[str]] = {}
    seen: set[Path] = set()
    queue = [entry]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for module, names in imported_names(ast.parse(path.read_text(), str(path))):
            parts = module.split(".")
            # A package's parents run first; `from package import submodule` runs it too.
            candidates = [".".join(parts[: i + 1]) for i in range(len(parts))]
            candidates += [f"{module}.{name}" for name in names]
            local = [file for file in map(module_file, candidates) if file is not None]
            if local:
                queue += local
            elif parts[0] not in sys.stdlib_module_names:
                found.setdefault(parts[0], set()).add(str(path.relative_to(ROOT)))
    return found


def requirements(distribution: str) -> list[Requirement]:
    """What an installed distribution needs on the device (no extras)."""
    needs = [Requirement(text) for text in importlib.metadata.requires(distribution) or []]
    return [
        r for r in needs if r.marker is None or r.marker.evaluate(DEVICE_MARKERS | {"extra": ""})
    ]


def test_the_kit_pins_every_package_and_the_image_lists_names():
    kit = listed(KIT)
    assert kit, "device-kit.txt lists no package"
    unpinned = [name for name, version in kit.items() if version is None]
    assert not unpinned, f"device-kit.txt must pin every package: {unpinned}"
    assert "torch" in listed(IMAGE)


def test_the_kit_has_the_venvs_versions():
    kit = listed(KIT)
    mismatched = {
        name: (version, importlib.metadata.version(name))
        for name, version in kit.items()
        if name not in VENV_DIFFERS and importlib.metadata.version(name) != version
    }
    assert not mismatched, f"device-kit.txt (kit, .venv): {mismatched}"
    # Where pyproject.toml pins a version, the kit has that one.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        pins = [s.version for s in requirement.specifier if s.operator == "=="]
        if pins and normal(requirement.name) in kit:
            assert kit[normal(requirement.name)] == pins[0], requirement


def test_every_import_of_the_gpu_check_is_in_the_image_or_the_kit():
    """Each third-party package the benchmark can import, and each one that a kit package
    needs in turn, is in the device's image (at a version the need admits, where the image's
    version is known) or in the kit."""
    image, kit = listed(IMAGE), listed(KIT)
    imports = third_party_imports(ENTRY)
    assert {"torch", "diffusers", "transformers", "pydantic", "imageio_ffmpeg"} <= set(imports)
    distributions = importlib.metadata.packages_distributions()
    missing: list[str] = []
    queue: list[tuple[str, str]] = []
    for module, importers in sorted(imports.items()):
        owners = distributions.get(module)
        assert owners, f"no installed distribution provides {module} ({sorted(importers)})"
        queue += [(normal(owner), f"import {module} in {sorted(importers)[0]}") for owner in owners]
    seen: set[str] = set()
    while queue:
        name, why = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in kit:
            for need in requirements(name):
                needed = normal(need.name)
                known = image.get(needed)
                if needed not in kit and known and not need.specifier.contains(known, True):
                    missing.append(f"{need} (the image has {known}), needed by {name}")
                queue.append((needed, f"{need}, needed by {name}"))
        elif not in_image(name, image) and name not in DECLARED_NOT_IMPORTED:
            missing.append(f"{name}: {why}")
    assert not missing, "add to benchmarks/device-kit.txt:\n" + "\n".join(sorted(missing))


def test_the_kit_has_nothing_the_check_does_not_need():
    """Every kit package is imported by the benchmark or needed by another kit package."""
    kit = listed(KIT)
    distributions = importlib.metadata.packages_distributions()
    needed = {
        normal(owner)
        for module in third_party_imports(ENTRY)
        for owner in distributions.get(module, [])
    }
    for name in kit:
        needed |= {normal(need.name) for need in requirements(name)}
    needed |= set(IMPORTED_WHEN_PRESENT)
    assert set(kit) <= needed, f"not needed: {sorted(set(kit) - needed)}"


@pytest.mark.parametrize("script", ["gpu_check.sh", "device_image_env.sh"])
def test_the_scripts_parse_and_run(script: str):
    path = BENCHMARKS / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_the_check_installs_the_kit_only_from_its_folder():
    script = (BENCHMARKS / "gpu_check.sh").read_text()
    assert "set -euo pipefail" in script
    assert "--no-index --no-deps" in script
    assert '"${wheels[@]}"' in script
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bdevice-kit\b", makefile, re.M)
    assert "-r benchmarks/device-kit.txt" in makefile
    assert ".whl/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.fixture(scope="module")
def benchmark() -> Iterator[ModuleType]:
    """benchmarks/gpu_full_random.py as a module (its folder on sys.path, as when run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("gpu_full_random")


def test_known_gpus_get_their_own_peaks(benchmark: ModuleType):
    assert benchmark.known_peak("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert benchmark.known_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert benchmark.known_peak("NVIDIA H200").name == "H200"
    assert benchmark.known_peak("NVIDIA GeForce RTX 4090") is None


def test_bounds_scale_with_the_work(benchmark: ModuleType):
    """Counted at small shapes (seconds); the full ones are flops.py's own test."""
    bounds = benchmark.Bounds(benchmark.Peak("test", 1e15, 1e12))
    one = bounds.sdxl(1, 1, 64, 64)
    assert bounds.sdxl(1, 3, 64, 64) == pytest.approx(3 * one)
    step = bounds.sdxl(2, 1, 64, 64) - one
    assert 0 < step < one  # one step and the VAE decode
    assert bounds.wan(4, 1, 64, 32) > bounds.wan(2, 1, 64, 32) > 0
    # Qwen at batch 1 reads 15.2 GB of weights a token: memory-bound at 1 TB/s.
    assert bounds.qwen(1, 10) == pytest.approx(10 * 15.2e9 / 1e12, rel=0.01)
    assert bounds.qwen(8, 10) == bounds.qwen(1, 10)


def test_a_short_video_is_extrapolated_and_reported(benchmark: ModuleType, tmp_path: Path):
    measured = benchmark.StepMeasurement(seconds=30.0, steps=25, step_s=1.0, peak=2**30)
    assert measured.extrapolate(50) == pytest.approx(55.0)
    report = benchmark.Report(
        {
            "profile": "full-random",
            "device_name": "NVIDIA H100 80GB HBM3",
            "peak": {"name": "H100 SXM", "flops": 989e12, "bytes_per_s": 3.35e12},
            "versions": {"torch": "2.11.0", "diffusers": "0.42.1", "transformers": "5.17.0"},
        },
        tmp_path / "check.json",
        tmp_path / "check.md",
    )
    report.add(
        benchmark.Row(
            model="WAN",
            work="81-frame video, 50 steps, 832x480",
            seconds=measured.extrapolate(50),
            rate="55.00 s/video",
            peak_memory_bytes=measured.peak,
            bound_s=27.5,
            measured_steps=25,
            measured_s=30.0,
            step_s=1.0,
        )
    )
    row = json.loads((tmp_path / "check.json").read_text())["rows"][0]
    assert row["ratio"] == pytest.approx(2.0)
    assert row["measured_steps"] == 25
    table = (tmp_path / "check.md").read_text()
    assert "| WAN | 81-frame video, 50 steps, 832x480 | 55.00 |" in table
    assert "extrapolated from 25 steps run in 30.00 s" in table
    assert "1.0 GiB" in table
    assert "H100 SXM" in table
