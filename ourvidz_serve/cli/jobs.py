"""Commands that talk to the service over HTTP: submit, wait, status, cancel, enhance, job-types."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ourvidz_serve.catalog import (
    JOB_TYPES,
    WAN_MAX_FRAMES,
    ModelFamily,
    OutputFormat,
    ReferenceType,
)
from ourvidz_serve.cli.client import (
    ApiClient,
    CliError,
    WaitTimedOut,
    download,
    file_name_from_url,
)
from ourvidz_serve.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ApiKeyOption,
    UrlOption,
    UserIdOption,
    app,
    console,
    fail,
    fail_with,
    resolve_connection,
)
from ourvidz_serve.prompts import MAX_PROMPT_CHARS

MAX_SEED = 2**32 - 1


class EnhanceTarget(StrEnum):
    """The model an enhanced prompt is written for (POST /v1/enhance ``target``)."""

    SDXL = "sdxl"
    WAN_IMAGE = "wan_image"
    WAN_VIDEO = "wan_video"


# --- submit: arguments to a request body (pure, tested without a service) ------------------


def check_job_type(value: str) -> str:
    if value not in JOB_TYPES:
        raise typer.BadParameter(
            f"unknown job type {value!r}; valid job types: {', '.join(JOB_TYPES)}"
        )
    return value


def build_job_request(
    job_type: str,
    prompt: str,
    *,
    user_id: UUID | None = None,
    num_images: int | None = None,
    seed: int | None = None,
    negative_prompt: str | None = None,
    reference_key: str | None = None,
    reference_url: str | None = None,
    reference_type: ReferenceType | None = None,
    reference_strength: float | None = None,
    frame_num: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body, after the checks the catalog allows without the service.

    Raises typer.BadParameter (a usage error, exit 2) naming the option and what is valid.
    """
    spec = JOB_TYPES[check_job_type(job_type)]
    text = prompt.strip()
    if not text:
        raise typer.BadParameter("the prompt is empty", param_hint="'PROMPT'")
    if len(text) > MAX_PROMPT_CHARS:
        raise typer.BadParameter(
            f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed",
            param_hint="'PROMPT'",
        )
    if num_images is not None and num_images not in spec.allowed_num_images:
        allowed = ", ".join(str(n) for n in spec.allowed_num_images)
        raise typer.BadParameter(
            f"{num_images} images are not allowed for {job_type}; allowed: {allowed}",
            param_hint="'--num-images'",
        )
    if spec.model is not ModelFamily.SDXL:
        sdxl_only = {
            "--negative-prompt": negative_prompt,
            "--reference-key": reference_key,
            "--reference-url": reference_url,
            "--reference-type": reference_type,
            "--reference-strength": reference_strength,
        }
        for option, value in sdxl_only.items():
            if value is not None:
                raise typer.BadParameter(
                    f"only SDXL job types (sdxl_image_fast, sdxl_image_high) take it, "
                    f"not {job_type}",
                    param_hint=f"'{option}'",
                )
    if frame_num is not None and spec.format is not OutputFormat.VIDEO:
        videos = ", ".join(n for n, s in JOB_TYPES.items() if s.format is OutputFormat.VIDEO)
        raise typer.BadParameter(
            f"only video job types ({videos}) take a frame count, not {job_type}",
            param_hint="'--frame-num'",
        )
    if reference_key is not None and reference_url is not None:
        raise typer.BadParameter(
            "give --reference-key or --reference-url, not both", param_hint="'--reference-url'"
        )
    if (reference_type is not None or reference_strength is not None) and (
        reference_key is None and reference_url is None
    ):
        raise typer.BadParameter(
            "needs a reference image (--reference-key or --reference-url)",
            param_hint="'--reference-type' / '--reference-strength'",
        )
    body: dict[str, Any] = {"job_type": job_type, "prompt": text}
    optional: dict[str, Any] = {
        "user_id": str(user_id) if user_id is not None else None,
        "num_images": num_images,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "reference_image_key": reference_key,
        "reference_image_url": reference_url,
        "reference_type": reference_type.value if reference_type is not None else None,
        "reference_strength": reference_strength,
        "frame_num": frame_num,
        "metadata": metadata,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return body


def _parse_metadata(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="'--metadata'") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="'--metadata'")
    return parsed


# --- following a job ------------------------------------------------------------------------


class JobFollower:
    """Shows a job's SSE events: a rich progress bar on a terminal, plain lines elsewhere."""

    def __init__(self, out: Console, job: dict[str, Any]) -> None:
        self.out = out
        self.job = job
        self.short = str(job["id"])[:8]
        self.assets_total = len(job.get("assets") or ()) or 1
        self.assets_seen: set[int] = set()
        self.status = str(job.get("status", "queued"))
        self.plain = not out.is_terminal
        self.last_step: tuple[int, int] | None = None
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            console=out,
            transient=False,
        )
        self.task: TaskID = self.progress.add_task(self._description(), total=None)

    def _description(self) -> str:
        return f"{self.job['job_type']} {self.short}: {self.status}"

    def __enter__(self) -> JobFollower:
        if not self.plain:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.plain:
            self.progress.stop()

    def _say(self, text: str) -> None:
        target = self.out if self.plain else self.progress.console
        target.print(text, soft_wrap=True, highlight=False, markup=False)

    def finish(self, job: dict[str, Any]) -> None:
        """Show the job's last recorded step when the stream had none (it ended first)."""
        progress = job.get("progress")
        if self.last_step is None and progress:
            self.on_event("progress", {"step": progress["step"], "total": progress["total"]})
        self.on_event("status", {"status": job["status"]})

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "status":
            status = str(data.get("status"))
            if status != self.status:
                self.status = status
                self._say(f"status: {status}")
            self.progress.update(self.task, description=self._description())
        elif kind == "progress":
            step, total = int(data.get("step", 0)), int(data.get("total", 0))
            if (step, total) == self.last_step:
                return
            self.last_step = (step, total)
            self.progress.update(self.task, completed=step, total=total or None)
            if self.plain:
                self._say(f"progress: step {step}/{total}")
        elif kind == "asset":
            index = int(data.get("index", 0))
            if index not in self.assets_seen:
                self.assets_seen.add(index)
                self._say(f"asset {index + 1}/{self.assets_total} stored")


def wait_for_job(
    client: ApiClient, out: Console, job: dict[str, Any], timeout_s: float | None
) -> dict[str, Any]:
    """Follow the job's events to its end; return the final job resource."""
    job_id = str(job["id"])
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        with JobFollower(out, job) as follower:
            client.follow_events(job_id, follower.on_event, deadline)
            final: dict[str, Any] = client.get(f"/v1/jobs/{job_id}")
            follower.finish(final)
    except WaitTimedOut:
        raise CliError(
            f"timed out after {timeout_s:g} s waiting for job {job_id}",
            hint=f"the job goes on: ourvidz-serve status {job_id}",
        ) from None
    except KeyboardInterrupt:
        console(stderr=True).print(
            f"stopped waiting; job {job_id} goes on (ourvidz-serve cancel {job_id} stops it)",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    return final


def save_assets(job: dict[str, Any], directory: Path) -> list[Path]:
    """Download every asset of a completed job (and a video's poster) into ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create {directory}: {exc.strerror or exc}") from None
    saved: list[Path] = []
    for asset in sorted(job.get("assets") or (), key=lambda a: int(a.get("index", 0))):
        stem = Path(str(asset.get("path") or f"{job['id']}_{asset.get('index', 0)}")).name
        for key in ("url", "thumbnail_url"):
            url = asset.get(key)
            if not url:
                continue
            fallback = stem if key == "url" else f"{Path(stem).stem}_poster"
            target = directory / file_name_from_url(str(url), fallback)
            download(str(url), target)
            saved.append(target)
    return saved


def report_end(out: Console, job: dict[str, Any], output: Path | None) -> int:
    """Print how a job ended (and save its files); return the exit code."""
    job_id, status = job["id"], job["status"]
    if status == "completed":
        seconds = (job.get("metadata") or {}).get("generation_time")
        took = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
        out.print(f"[bold green]completed[/]: job {job_id}{took}", soft_wrap=True)
        if output is not None:
            saved = save_assets(job, output)
            out.print(f"saved {len(saved)} file(s) to {output}:", soft_wrap=True)
            for path in saved:
                out.print(f"  {path}", soft_wrap=True, markup=False)
        else:
            for asset in job.get("assets") or ():
                if asset.get("url"):
                    out.print(f"  {asset['index']}: {asset['url']}", soft_wrap=True, markup=False)
        return EXIT_OK
    if status == "failed":
        message = job.get("error_message") or "no error message recorded"
        raise fail(f"job {job_id} failed: {message}", EXIT_FAILED)
    if status == "cancelled":
        raise fail(f"job {job_id} was cancelled", EXIT_FAILED)
    raise fail(f"job {job_id} is {status}", EXIT_FAILED)


# --- commands -------------------------------------------------------------------------------


@app.command(
    help="Submit a job (POST /v1/jobs) and print its id; with --wait follow it to the end.\n\n"
    "JOB_TYPE is one of the ten job types (ourvidz-serve job-types lists them). Options the "
    "job type does not take are refused before anything is sent. With --wait (or --output) "
    "the command shows the job's progress from its event stream and exits 0 when it "
    "completes, 1 when it fails or is cancelled."
)
def submit(
    ctx: typer.Context,
    job_type: Annotated[
        str,
        typer.Argument(
            help=f"One of: {', '.join(JOB_TYPES)}",
            callback=check_job_type,
            show_default=False,
        ),
    ],
    prompt: Annotated[str, typer.Argument(help="What to generate", show_default=False)],
    num_images: Annotated[
        int | None,
        typer.Option(
            "--num-images", "-n", help="Images: 1, 3 or 6 for SDXL types, 1 for WAN types"
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_SEED, help="0 to 2^32-1 (image i gets seed+i); default random"),
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option("--negative-prompt", help="SDXL: replaces the generated one")
    ] = None,
    reference_key: Annotated[
        str | None,
        typer.Option("--reference-key", help="SDXL: a reference image's key in reference_images"),
    ] = None,
    reference_url: Annotated[
        str | None,
        typer.Option("--reference-url", help="SDXL: an https URL of a reference image"),
    ] = None,
    reference_type: Annotated[
        ReferenceType | None,
        typer.Option("--reference-type", help="SDXL: what the reference steers (default: style)"),
    ] = None,
    reference_strength: Annotated[
        float | None,
        typer.Option(
            "--reference-strength", min=0.1, max=1.0, help="SDXL: 0.1 to 1.0 (default: 0.7)"
        ),
    ] = None,
    frame_num: Annotated[
        int | None,
        typer.Option(
            "--frame-num",
            min=1,
            max=WAN_MAX_FRAMES,
            help=f"Video types: 1 to {WAN_MAX_FRAMES} frames, rounded to 4k+1 (default: 81)",
        ),
    ] = None,
    metadata: Annotated[
        str | None,
        typer.Option("--metadata", help="A JSON object merged into the job's metadata"),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Submitting again with it returns the same job"),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the job to its end with a progress bar")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            file_okay=False,
            help="Download the finished files (and a video's poster) here; implies --wait",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, help="Stop waiting after this many seconds (the job goes on)"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the job resource(s) as JSON, not text")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    user_id: UserIdOption = None,
) -> None:
    connection = resolve_connection(ctx, url, api_key, user_id)
    if connection.user_id is None and not connection.is_user_token:
        raise typer.BadParameter(
            "a service API key submits for a user: give --user-id UUID (or OURVIDZ_USER_ID)",
            param_hint="'--user-id'",
        )
    body = build_job_request(
        job_type,
        prompt,
        user_id=None if connection.is_user_token else connection.user_id,
        num_images=num_images,
        seed=seed,
        negative_prompt=negative_prompt,
        reference_key=reference_key,
        reference_url=reference_url,
        reference_type=reference_type,
        reference_strength=reference_strength,
        frame_num=frame_num,
        metadata=_parse_metadata(metadata),
    )
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    out = console()
    try:
        with ApiClient(connection) as client:
            job = client.post("/v1/jobs", json=body, headers=headers)
            if as_json and not (wait or output):
                typer.echo(json.dumps(job, indent=2))
                return
            if not as_json:
                _print_submitted(out, job)
            if not (wait or output):
                return
            final = wait_for_job(client, console(stderr=True) if as_json else out, job, timeout)
    except CliError as error:
        raise fail_with(error) from None
    if as_json:
        typer.echo(json.dumps(final, indent=2))
    try:
        code = report_end(console(stderr=True) if as_json else out, final, output)
    except CliError as error:
        raise fail_with(error) from None
    raise typer.Exit(code)


def _print_submitted(out: Console, job: dict[str, Any]) -> None:
    seed = (job.get("metadata") or {}).get("seed")
    count = len(job.get("assets") or ())
    what = f"{count} {'images' if count != 1 else 'asset'}" if count else "no assets"
    if job.get("format") == "video":
        what = "1 video"
    seed_text = f", seed {seed}" if seed is not None else ""
    out.print(f"submitted {job['job_type']} job ({what}{seed_text}): {job['status']}")
    out.print(f"job id: {job['id']}", markup=False)


@app.command(
    "wait",
    help="Follow a submitted job to its end (progress bar); exit 0 when it completes, 1 when "
    "it fails or is cancelled. --output downloads its files.",
)
def wait_command(
    ctx: typer.Context,
    job_id: Annotated[UUID, typer.Argument(help="The job's id", show_default=False)],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", file_okay=False, help="Download the finished files here"),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Stop waiting after this many seconds")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    connection = resolve_connection(ctx, url, api_key)
    out = console()
    try:
        with ApiClient(connection) as client:
            job = client.get(f"/v1/jobs/{job_id}")
            if job["status"] not in ("completed", "failed", "cancelled"):
                job = wait_for_job(client, out, job, timeout)
        code = report_end(out, job, output)
    except CliError as error:
        raise fail_with(error) from None
    raise typer.Exit(code)


@app.command(
    help="Show a job: status, progress, timings, error and its assets with their URLs "
    "(GET /v1/jobs/{id})."
)
def status(
    ctx: typer.Context,
    job_id: Annotated[UUID, typer.Argument(help="The job's id", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw job resource")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    connection = resolve_connection(ctx, url, api_key)
    try:
        with ApiClient(connection) as client:
            job = client.get(f"/v1/jobs/{job_id}")
    except CliError as error:
        raise fail_with(error) from None
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    print_job(console(), job)


STATUS_STYLES = {
    "queued": "yellow",
    "processing": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}


def print_job(out: Console, job: dict[str, Any]) -> None:
    status_text = job["status"]
    style = STATUS_STYLES.get(status_text, "")
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    summary.add_row("job", str(job["id"]))
    summary.add_row("type", f"{job['job_type']} ({job.get('format')}, {job.get('quality')})")
    summary.add_row("status", f"[{style}]{status_text}[/]" if style else status_text)
    progress = job.get("progress")
    if progress:
        summary.add_row("progress", f"step {progress['step']}/{progress['total']}")
    summary.add_row("user", str(job.get("user_id")))
    summary.add_row("prompt", _escape(str(job.get("prompt", ""))))
    metadata = job.get("metadata") or {}
    if metadata.get("seed") is not None:
        summary.add_row("seed", str(metadata["seed"]))
    for label, key in (("created", "created_at"), ("started", "started_at")):
        if job.get(key):
            summary.add_row(label, str(job[key]))
    if job.get("completed_at"):
        summary.add_row("ended", str(job["completed_at"]))
    if isinstance(metadata.get("generation_time"), int | float):
        summary.add_row("generation", f"{metadata['generation_time']:.2f} s")
    summary.add_row("attempts", str(job.get("attempts", 0)))
    if job.get("error_message"):
        summary.add_row("error", f"[red]{_escape(str(job['error_message']))}[/]")
    out.print(summary)
    assets = job.get("assets") or []
    if not assets:
        return
    table = Table(title="Assets", title_justify="left")
    for column in ("#", "kind", "status", "seed", "file", "completed"):
        table.add_column(column, justify="right" if column in ("#", "seed") else "left")
    for asset in assets:
        table.add_row(
            str(asset.get("index")),
            str(asset.get("kind")),
            str(asset.get("status")),
            "-" if asset.get("seed") is None else str(asset["seed"]),
            _escape(f"{asset.get('bucket')}/{asset.get('path')}"),
            str(asset.get("completed_at") or "-"),
        )
    out.print(table)
    # Whole URLs on their own lines (a table cell would fold them): they can be copied.
    for asset in assets:
        for label, key in (("url", "url"), ("poster", "thumbnail_url")):
            if asset.get(key):
                out.print(f"{asset['index']} {label}: {asset[key]}", soft_wrap=True, markup=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@app.command(
    help="Cancel a job (DELETE /v1/jobs/{id}): a queued one at once, a running one at its "
    "next denoising step. A job that already ended is an error (exit 1)."
)
def cancel(
    ctx: typer.Context,
    job_id: Annotated[UUID, typer.Argument(help="The job's id", show_default=False)],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    connection = resolve_connection(ctx, url, api_key)
    try:
        with ApiClient(connection) as client:
            job = client.delete(f"/v1/jobs/{job_id}")
    except CliError as error:
        if error.message.startswith("conflict:"):
            error.hint = error.hint or "only a queued or running job can be cancelled"
            error.message = f"cannot cancel job {job_id}: {error.message}"
        raise fail_with(error) from None
    console().print(f"job {job['id']}: {job['status']}", soft_wrap=True)


@app.command(
    help="Enhance a prompt for a model with the Qwen enhancer (POST /v1/enhance); prints the "
    "original and enhanced prompt, the model, the time and whether it fell back."
)
def enhance(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt to enhance", show_default=False)],
    target: Annotated[
        EnhanceTarget,
        typer.Option("--target", "-t", help="The model the prompt is written for"),
    ] = EnhanceTarget.SDXL,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw answer")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    if not prompt.strip():
        raise typer.BadParameter("the prompt is empty", param_hint="'PROMPT'")
    connection = resolve_connection(ctx, url, api_key)
    try:
        with ApiClient(connection) as client:
            answer = client.post("/v1/enhance", json={"prompt": prompt, "target": target.value})
    except CliError as error:
        raise fail_with(error) from None
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    print_enhancement(console(), answer)


def print_enhancement(out: Console, answer: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("original", _escape(str(answer.get("original_prompt", ""))))
    grid.add_row("enhanced", _escape(str(answer.get("enhanced_prompt", ""))))
    grid.add_row("target", str(answer.get("target", "")))
    grid.add_row("model", _escape(str(answer.get("model") or "none")))
    seconds = answer.get("generation_time")
    grid.add_row("time", f"{seconds:.2f} s" if isinstance(seconds, int | float) else "?")
    fallback = bool(answer.get("fallback"))
    grid.add_row("fallback", "[yellow]yes[/] (the original prompt)" if fallback else "no")
    if answer.get("warning"):
        grid.add_row("warning", f"[yellow]{_escape(str(answer['warning']))}[/]")
    out.print(grid)


@app.command(
    "job-types",
    help="List the job types the service offers with their defaults (GET /v1/job-types).",
)
def job_types(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw answer")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    connection = resolve_connection(ctx, url, api_key)
    try:
        with ApiClient(connection) as client:
            types = client.get("/v1/job-types")
    except CliError as error:
        raise fail_with(error) from None
    if as_json:
        typer.echo(json.dumps(types, indent=2))
        return
    print_job_types(console(), types)


def print_job_types(out: Console, types: list[dict[str, Any]]) -> None:
    table = Table(title="Job types", title_justify="left")
    columns = ("job_type", "model", "format", "steps", "guidance", "size", "frames", "images")
    for column in (*columns, "expected"):
        right = column in ("steps", "guidance", "frames", "expected")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for item in types:
        model = str(item.get("model"))
        if item.get("enhanced"):
            model = f"qwen+{model}"
        video = item.get("format") == "video"
        fps = f" @{item['fps']}fps" if video and item.get("fps") else ""
        table.add_row(
            str(item["job_type"]),
            model,
            str(item.get("format")),
            str(item.get("steps")),
            f"{item.get('guidance_scale', 0):g}",
            f"{item.get('width')}x{item.get('height')}",
            f"{item['num_frames']}{fps}" if video else "-",
            ", ".join(str(n) for n in item.get("allowed_num_images") or ()),
            f"{item.get('expected_time_s', 0):g} s",
        )
    out.print(table)
    out.print("expected: the seed's generation time on an RTX 6000 Ada (SDXL: per image)")
