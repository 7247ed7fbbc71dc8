"""The platform's TypeScript types, generated from schemas/ (clients/typescript).

The tools are the project's pinned npm devDependencies, installed by `make test` (`npm ci`
in clients/typescript). tsc takes a second or two per run, so the compile-failure cases share
one run over several files.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "typescript"
BIN = CLIENT / "node_modules" / ".bin"
TIMEOUT_S = 120


def tool(name: str) -> str:
    assert shutil.which("node"), "node is not on PATH: the TypeScript checks need Node.js 20"
    path = BIN / name
    assert path.exists(), (
        f"{path} is missing: run `make test`, which runs `npm ci` in clients/typescript "
        "when its package-lock.json changes (or run `npm ci` there yourself)"
    )
    return str(path)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def generate_command(script: str, output: Path) -> tuple[list[str], Path]:
    """A package.json `generate:*` script's command writing to ``output``, and the committed
    file it writes."""
    scripts = json.loads((CLIENT / "package.json").read_text())["scripts"]
    words = shlex.split(scripts[script])
    at = words.index("--output") + 1
    committed = CLIENT / words[at]
    words[at] = str(output)
    return [tool(words[0]), *words[1:]], committed


@pytest.mark.parametrize("script", ["generate:api", "generate:callback"])
def test_the_committed_typescript_types_are_regenerated_from_schemas(script, tmp_path):
    output = tmp_path / "generated.d.ts"
    command, committed = generate_command(script, output)
    result = run(command, CLIENT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.read_text() == committed.read_text(), (
        f"{committed.relative_to(CLIENT.parents[1])} drifted from schemas/: run `make schemas`"
    )


def test_the_typescript_client_and_its_usage_compile():
    result = run([tool("tsc"), "--noEmit", "--pretty", "false", "-p", str(CLIENT)], CLIENT)
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass(frozen=True)
class Case:
    """A snippet of platform code with ``{value}`` where a closed set's member goes."""

    source: str
    good: str
    typo: str


CASES = {
    "job_type": Case(
        'import type { JobRequest } from "{api}";\n'
        'export const request: JobRequest = { job_type: "{value}", prompt: "a cat" };\n',
        good="sdxl_image_fast",
        typo="sdxl_image_fastt",
    ),
    "status": Case(
        'import type { JobResource } from "{api}";\n'
        "export function ended(job: JobResource): boolean {\n"
        '  return job.status === "completed" || job.status === "{value}";\n'
        "}\n",
        good="cancelled",
        typo="canceled",
    ),
    "reference_type": Case(
        'import type { JobRequest } from "{api}";\n'
        "export const request: JobRequest = {\n"
        '  job_type: "sdxl_image_high",\n'
        '  prompt: "a cat in the style of the reference",\n'
        '  reference_image_key: "references/u/cat.png",\n'
        '  reference_type: "{value}",\n'
        "};\n",
        good="style",
        typo="styles",
    ),
    "enhancement_target": Case(
        'import type { EnhanceBody } from "{api}";\n'
        'export const body: EnhanceBody = { prompt: "a fox", target: "{value}" };\n',
        good="wan_video",
        typo="wan",
    ),
    "callback_status": Case(
        'import type { CallbackPayload } from "{callback}";\n'
        "export function succeeded(payload: CallbackPayload): boolean {\n"
        '  return payload.status === "{value}";\n'
        "}\n",
        good="completed",
        typo="succeeded",
    ),
}

ERROR = re.compile(r"^(?P<file>[^\s(]+)\(\d+,\d+\): error TS\d+: ")


@pytest.fixture(scope="module")
def tsc_errors(tmp_path_factory) -> dict[str, list[str]]:
    """One tsc run over every case twice, with a typo and with a valid value: each file's
    errors (a message and its indented continuation lines)."""
    directory = tmp_path_factory.mktemp("typescript")
    (directory / "tsconfig.json").write_text(
        json.dumps({"extends": str(CLIENT / "tsconfig.json"), "include": ["*.ts"]})
    )
    imports = {"api": str(CLIENT / "src" / "api"), "callback": str(CLIENT / "src" / "callback")}
    for name, case in CASES.items():
        for variant, value in (("typo", case.typo), ("good", case.good)):
            source = case.source.replace("{value}", value)
            for key, path in imports.items():
                source = source.replace("{" + key + "}", path)
            (directory / f"{variant}_{name}.ts").write_text(source)
    result = run([tool("tsc"), "--noEmit", "--pretty", "false", "-p", "."], directory)
    errors: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in result.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            current = errors.setdefault(Path(match["file"]).stem, [])
            current.append(line)
        elif line.startswith(" ") and current:
            current[-1] += "\n" + line
        else:
            current = None
            errors.setdefault("unattributed", []).append(line)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "unattributed" not in errors, result.stdout + result.stderr
    return errors


@pytest.mark.parametrize("name", list(CASES))
def test_a_value_outside_a_closed_set_does_not_compile(name, tsc_errors):
    """The platform's code names job types, statuses, reference types and enhancement
    targets as literals; a typo must fail its build, not reach the API."""
    typo = CASES[name].typo
    errors = tsc_errors.get(f"typo_{name}", [])
    assert errors, f"a {name} of {typo!r} compiled"
    for error in errors:
        assert f'"{typo}"' in error, f"the error does not name {typo!r}: {error}"
    assert f"good_{name}" not in tsc_errors, tsc_errors[f"good_{name}"]
