"""What every command shares: the typer app, the global options, consoles and exit codes."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit
from uuid import UUID

import typer
from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NO = EXIT_FAILED
"""``plan``: the answer is no (something does not fit)."""
EXIT_INTERRUPTED = 130

DEFAULT_URL = "http://127.0.0.1:8000"
DEV_KEY_FILE = "dev-api-key"
"""Where ``make serve`` keeps the tiny profile's development key, inside the data dir."""

CONNECTION_PANEL = "Connection"

app = typer.Typer(
    name="ourvidz-serve",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class CliError(Exception):
    """A failure to tell the user about (no traceback): a message and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.hint = hint


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr), at least 110 columns wide so tables stay readable."""
    width = max(shutil.get_terminal_size((120, 24)).columns, 110)
    return Console(stderr=stderr, width=width, highlight=False)


def fail(message: str, code: int = EXIT_USAGE, hint: str | None = None) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned Exit."""
    err = console(stderr=True)
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    if hint:
        err.print(f"[dim]hint:[/] {hint}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def fail_with(error: CliError) -> typer.Exit:
    return fail(error.message, error.exit_code, error.hint)


# --- connection options: global (before the command) or per command (after it) -------------


@dataclass(frozen=True)
class Connection:
    """Where the service is and how to authenticate to it."""

    url: str
    api_key: str | None
    user_id: UUID | None
    api_key_source: str
    """Where the key came from, for error hints: 'option', 'environment', a file, or 'none'."""

    @property
    def is_user_token(self) -> bool:
        """A user JWT (three dot-separated parts) carries its own user id; a service key not."""
        return self.api_key is not None and self.api_key.count(".") == 2


@dataclass(frozen=True)
class GlobalOptions:
    url: str | None
    api_key: str | None
    user_id: UUID | None


def data_dir() -> Path:
    return Path(os.environ.get("OURVIDZ_DATA_DIR") or ".ourvidz")


def dev_key_path() -> Path:
    return data_dir() / DEV_KEY_FILE


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise typer.BadParameter(
            f"{url!r} is not an http(s) URL; e.g. {DEFAULT_URL}", param_hint="'--url'"
        )
    return url.rstrip("/")


def resolve_connection(
    ctx: typer.Context,
    url: str | None = None,
    api_key: str | None = None,
    user_id: UUID | None = None,
) -> Connection:
    """Per-command options win over the global ones (which include the environment)."""
    glob = ctx.find_object(GlobalOptions) or GlobalOptions(None, None, None)
    chosen_url = check_url(url or glob.url or os.environ.get("OURVIDZ_URL") or DEFAULT_URL)
    key, source = api_key or glob.api_key, "option"
    if key is None and os.environ.get("OURVIDZ_API_KEY"):
        key, source = os.environ["OURVIDZ_API_KEY"], "OURVIDZ_API_KEY"
    if key is None:
        path = dev_key_path()
        try:
            key = path.read_text().strip() or None
            source = str(path)
        except OSError:
            key, source = None, "none"
    chosen_user = user_id or glob.user_id
    if chosen_user is None and os.environ.get("OURVIDZ_USER_ID"):
        try:
            chosen_user = UUID(os.environ["OURVIDZ_USER_ID"])
        except ValueError:
            raise typer.BadParameter(
                f"OURVIDZ_USER_ID={os.environ['OURVIDZ_USER_ID']!r} is not a UUID",
                param_hint="'--user-id'",
            ) from None
    return Connection(chosen_url, key, chosen_user, source)


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help=f"Base URL of the service (env OURVIDZ_URL; default {DEFAULT_URL})",
        show_default=False,
        rich_help_panel=CONNECTION_PANEL,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="Service API key or user JWT (env OURVIDZ_API_KEY; default: the development key "
        "in $OURVIDZ_DATA_DIR/dev-api-key, i.e. .ourvidz/dev-api-key, that `make serve` writes)",
        show_default=False,
        rich_help_panel=CONNECTION_PANEL,
    ),
]
UserIdOption = Annotated[
    UUID | None,
    typer.Option(
        "--user-id",
        help="The user a job is submitted for; required with a service key (env OURVIDZ_USER_ID)",
        show_default=False,
        rich_help_panel=CONNECTION_PANEL,
    ),
]


@app.callback(
    help="ourvidz-serve: submit and follow image/video jobs, and operate the Ray Serve "
    "service.\n\n"
    "The connection options go before the command (ourvidz-serve --url URL submit ...) or "
    "after it. Exit codes: 0 done; 1 failed (an HTTP error, a failed or cancelled job, an "
    "unreachable service; plan: does not fit); 2 wrong arguments."
)
def main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="OURVIDZ_URL",
            help=f"Base URL of the service (default: {DEFAULT_URL})",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="OURVIDZ_API_KEY",
            help="Service API key or user JWT (default: .ourvidz/dev-api-key, written by "
            "`make serve`)",
            show_default=False,
        ),
    ] = None,
    user_id: Annotated[
        UUID | None,
        typer.Option(
            "--user-id",
            envvar="OURVIDZ_USER_ID",
            help="The user jobs are submitted for (needed with a service key)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Keep the global options for the command (ctx.obj)."""
    ctx.obj = GlobalOptions(url, api_key, user_id)
