"""The platform's TypeScript types, generated from schemas/ (clients/typescript), and the
official `openai` npm package's client against the service's OpenAI-compatible routes
(src/openai-usage.ts).

The tools and the SDK are the project's pinned npm devDependencies, installed by `make test`
(`npm ci` in clients/typescript). tsc takes a few seconds per run, so the compile-failure cases
share one run over several files.
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
USAGE_FILES = ("usage.ts", "openai-usage.ts")
OPENAI_USAGE = CLIENT / "src" / "openai-usage.ts"
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
    command = [tool("tsc"), "--noEmit", "--strict", "--pretty", "false", "-p", str(CLIENT)]
    result = run(command, CLIENT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_projects_typecheck_covers_both_usage_files_strictly():
    """`npm run typecheck` (tsc -p, no flags) checks the usage files under --strict too."""
    result = run([tool("tsc"), "--showConfig", "-p", str(CLIENT)], CLIENT)
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads(result.stdout)
    assert config["compilerOptions"]["strict"] is True, config["compilerOptions"]
    files = {Path(file).name for file in config["files"]}
    for name in USAGE_FILES:
        assert name in files, f"tsconfig.json does not include src/{name}: {sorted(files)}"


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


@dataclass(frozen=True)
class Mistake:
    """A caller's mistake in src/openai-usage.ts: its one ``old`` text becomes ``new``. tsc must
    report it on that line, with ``expected`` in the message."""

    old: str
    new: str
    expected: str


OPENAI_MISTAKES = {
    "image_count": Mistake(
        "    n: 3,\n",
        '    n: "three",\n',
        "Type 'string' is not assignable to type 'number'",
    ),
    "image_model": Mistake(
        '    model: "sdxl_image_fast",\n',
        '    model: "sdxl_image_fastt",\n',
        "'\"sdxl_image_fastt\"' is not assignable to type 'ImageJobType'",
    ),
    "response_format": Mistake(
        '    response_format: "b64_json",\n',
        '    response_format: "base64",\n',
        "'\"base64\"' is not assignable",
    ),
    "seed": Mistake(
        "    seed: 42,\n",
        '    seed: "42",\n',
        "Type 'string' is not assignable to type 'number'",
    ),
    "video_model": Mistake(
        '    model: "video_fast",\n',
        '    model: "sdxl_image_fast",\n',
        "'\"sdxl_image_fast\"' is not assignable to type 'VideoJobType'",
    ),
    "video_size": Mistake(
        '    size: "832x480",\n',
        '    size: "832*480",\n',
        "'\"832*480\"' is not assignable to type '`${number}x${number}`'",
    ),
    "video_seconds": Mistake(
        '    seconds: "4",\n',
        "    seconds: 4,\n",
        "Type 'number' is not assignable to type '`${number}`'",
    ),
    "variant": Mistake(
        'download(client, video.id, "thumbnail")',
        'download(client, video.id, "thumb")',
        "'\"thumb\"' is not assignable",
    ),
    "sdk_method": Mistake(
        "client.videos.delete(id)",
        "client.videos.del(id)",
        "Property 'del' does not exist on type 'Videos'",
    ),
    # Why createVideo sends our params through the `body` request option: the SDK's
    # VideoCreateParams does not take our size and seconds. Should an SDK upgrade widen them,
    # this compiles; then pass `params` directly and drop the case.
    "video_params_without_the_body_option": Mistake(
        "client.videos.create({ prompt: params.prompt, model: params.model }, ",
        "client.videos.create(params, ",
        "'VideoParams' is not assignable to parameter of type 'VideoCreateParams'",
    ),
}


def openai_usage_copies() -> dict[str, str]:
    """src/openai-usage.ts as it is (``good_openai``) and with each mistake whose ``old`` text
    it holds exactly once (the mistake's test fails on the others)."""
    source = OPENAI_USAGE.read_text().replace('from "./api"', f'from "{CLIENT / "src" / "api"}"')
    copies = {"good_openai": source}
    for name, mistake in OPENAI_MISTAKES.items():
        if source.count(mistake.old) == 1:
            copies[f"mistake_openai_{name}"] = source.replace(mistake.old, mistake.new)
    return copies


ERROR = re.compile(r"^(?P<file>[^\s(]+)\((?P<line>\d+),\d+\): error TS\d+: ")


@pytest.fixture(scope="module")
def tsc_errors(tmp_path_factory) -> dict[str, list[str]]:
    """One tsc run over every case twice, with a typo and with a valid value, and over
    src/openai-usage.ts as it is and with each mistake: each file's errors (a message and its
    indented continuation lines)."""
    directory = tmp_path_factory.mktemp("typescript")
    (directory / "tsconfig.json").write_text(
        json.dumps({"extends": str(CLIENT / "tsconfig.json"), "include": ["*.ts"]})
    )
    # The copies import the `openai` package, which resolves through node_modules.
    (directory / "node_modules").symlink_to(CLIENT / "node_modules", target_is_directory=True)
    for name, source in openai_usage_copies().items():
        (directory / f"{name}.ts").write_text(source)
    imports = {"api": str(CLIENT / "src" / "api"), "callback": str(CLIENT / "src" / "callback")}
    for name, case in CASES.items():
        for variant, value in (("typo", case.typo), ("good", case.good)):
            source = case.source.replace("{value}", value)
            for key, path in imports.items():
                source = source.replace("{" + key + "}", path)
            (directory / f"{variant}_{name}.ts").write_text(source)
    command = [tool("tsc"), "--noEmit", "--strict", "--pretty", "false", "-p", "."]
    result = run(command, directory)
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


def test_the_openai_sdk_usage_compiles_under_strict(tsc_errors):
    """The control for the mistakes below: the unedited copy has no errors in the same run."""
    assert "good_openai" not in tsc_errors, "\n".join(tsc_errors["good_openai"])


@pytest.mark.parametrize("name", list(OPENAI_MISTAKES))
def test_a_mistake_in_calling_the_openai_sdk_does_not_compile(name, tsc_errors):
    """A caller's wrong count, model, size, extra field or SDK method fails its build: the
    check over src/openai-usage.ts would fail if the SDK's types stopped checking our calls."""
    mistake = OPENAI_MISTAKES[name]
    source = OPENAI_USAGE.read_text()
    assert source.count(mistake.old) == 1, (
        f"{mistake.old!r} is not in {OPENAI_USAGE.name} exactly once: update the {name} case"
    )
    line = source[: source.index(mistake.old)].count("\n") + 1
    errors = tsc_errors.get(f"mistake_openai_{name}", [])
    assert errors, f"{mistake.new.strip()!r} compiled"
    for error in errors:
        match = ERROR.match(error)
        assert match and int(match["line"]) == line, f"not the edited line {line}: {error}"
        assert mistake.expected in error, f"the error does not say {mistake.expected!r}: {error}"
