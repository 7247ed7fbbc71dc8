"""Named SQL statements from ``schemas/queries/*.sql`` (procrastinate's ``queries.sql`` shape).

A statement starts at a ``-- name: <name>`` line and runs to the next one; the comment lines
right after the name document it.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

# Package data of ourvidz_serve._sql (pyproject.toml maps it onto schemas/): inside the installed
# package from a wheel, schemas/queries itself in an editable install.
DEFAULT_QUERIES_DIR = Path(str(files("ourvidz_serve._sql") / "queries"))
_NAME_LINE = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """``{name: sql}`` from one file's text; duplicate or empty statements are refused."""
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = body.strip().rstrip(";").strip()
        if not sql or all(line.startswith("--") for line in sql.splitlines()):
            raise ValueError(f"query {name!r} has no statement")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = sql
    return queries


def load_queries(
    directory: Path = DEFAULT_QUERIES_DIR, substitutions: dict[str, str] | None = None
) -> dict[str, str]:
    """Every named query of the directory's ``.sql`` files, with ``{key}`` placeholders filled."""
    queries: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        for name, sql in parse_queries(path.read_text("utf-8")).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined in two files")
            for key, value in (substitutions or {}).items():
                sql = sql.replace("{" + key + "}", value)
            queries[name] = sql
    return queries
