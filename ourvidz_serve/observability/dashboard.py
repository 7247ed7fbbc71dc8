"""The Grafana dashboard shipped with the service, and the metric names its queries read.

``dashboards/ourvidz.json`` sits at the root of the repository, next to the package (so
:data:`DASHBOARD_PATH` is found in a source checkout or an editable install, not in a wheel).

Names are found by reading PromQL, not by guessing prefixes: string literals, comments,
``$variables``, grouping lists (``by (le, job_type)``, ``on (...)``, ``group_left (...)``)
and label matchers (``{...}``) are taken out, then every identifier left that is not part of
a number or a duration, is not followed by ``(`` (a function or aggregation) and is not a
keyword (``by``, ``and``, ``offset``, ``bool``, ``inf``, ...) is a metric name, exactly as
the scrape shows the sample (``ourvidz_generation_seconds_bucket``,
``ourvidz_jobs_finished_total``). A name given only as ``{__name__="..."}`` is not found.
``prefix`` keeps the names that start with it: ``"ourvidz_"`` for the families of the
ingress ``GET /metrics``, ``"ray_"`` for Ray Serve's own (Ray's metrics port, not ours).
No network, Ray or database is needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).resolve().parents[2] / "dashboards" / "ourvidz.json"

KEYWORDS = frozenset(
    {
        # aggregation operators (may be written "sum (x)" or "sum by (l) (x)")
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        # grouping and vector matching
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        # binary operators, modifiers and literals
        "and",
        "or",
        "unless",
        "atan2",
        "bool",
        "offset",
        "start",
        "end",
        "inf",
        "nan",
        # the histogram bucket label, should it appear outside a grouping list
        "le",
    }
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\[\[[^\]]*\]\]|\$\w+")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_MATCHERS = re.compile(r"\{[^{}]*\}")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[a-zA-Z_:][a-zA-Z0-9_:]*+(?!\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (see the module's docstring)."""
    text = _STRING.sub(" ", expr)
    text = _COMMENT.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _MATCHERS.sub("{}", text)
    return {
        name
        for name in _IDENTIFIER.findall(text)
        if name.lower() not in KEYWORDS and not name.startswith("__")
    }


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included (rows themselves too)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def exprs(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel's targets (template variable queries are not included)."""
    return [
        target["expr"]
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return loaded


def metric_names_in_dashboard(path: Path = DASHBOARD_PATH, prefix: str = "") -> set[str]:
    """Every metric name (sample name, as scraped) the dashboard's panel queries read.

    ``prefix="ourvidz_"`` keeps those the ingress ``GET /metrics`` exports.
    """
    names: set[str] = set()
    for expr in exprs(load_dashboard(path)):
        names |= promql_metric_names(expr)
    return {name for name in names if name.startswith(prefix)}
