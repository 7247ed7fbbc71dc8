"""The Grafana dashboard: a valid model, laid out, and reading only what ``/metrics`` exports."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ourvidz_serve.observability.dashboard import (
    DASHBOARD_PATH,
    exprs,
    load_dashboard,
    metric_names_in_dashboard,
    panels,
    promql_metric_names,
)
from ourvidz_serve.observability.metrics import FAMILIES, Family, Kind

ROOT = Path(__file__).resolve().parents[1]
PROVISIONING = ROOT / "dashboards" / "provisioning"
DATASOURCE_VARIABLE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "heatmap"}
UNITS = {"s", "ms", "bytes", "percentunit", "reqps", "ops", "short", "none"}


def sample_names(family: Family) -> set[str]:
    """The sample names a family has in Prometheus text format."""
    if family.kind is Kind.COUNTER:
        return {f"{family.name}_total"}
    if family.kind is Kind.HISTOGRAM:
        return {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return {family.name}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in panels(dashboard) if panel["type"] != "row"]


def variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in dashboard["templating"]["list"] if v["name"] == name]
    return found


def test_the_dashboard_is_a_grafana_dashboard_model(dashboard):
    assert DASHBOARD_PATH == ROOT / "dashboards" / "ourvidz.json"
    assert {"title", "uid", "panels", "schemaVersion", "templating"} <= dashboard.keys()
    assert dashboard["uid"] == dashboard["title"] == "ourvidz-serve"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # imports and provisioning assign their own
    datasource = variable(dashboard, "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    job_type = variable(dashboard, "job_type")
    assert job_type["type"] == "query" and job_type["datasource"] == DATASOURCE_VARIABLE
    assert job_type["query"]["query"] == "label_values(ourvidz_jobs_submitted_total, job_type)"
    assert job_type["includeAll"] and job_type["allValue"] == ".*"


def test_panel_ids_are_unique(dashboard):
    ids = [panel["id"] for panel in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))


def test_panels_are_laid_out_on_the_grid_without_overlap(dashboard):
    boxes = []
    for panel in dashboard["panels"]:  # a collapsed row's panels are placed when it opens
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((panel["title"], grid))
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{title_a!r} overlaps {title_b!r}"


def test_every_panel_has_a_known_type_a_unit_and_queries(dashboard):
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["title"]
    for panel in graph_panels(dashboard):
        assert panel["datasource"] == DATASOURCE_VARIABLE, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_target_uses_the_datasource_variable_and_has_an_expr(dashboard):
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_VARIABLE, panel["title"]
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]
            assert promql_metric_names(target["expr"]), target["expr"]


def test_every_ourvidz_name_is_a_sample_that_metrics_exports():
    exported = set().union(*(sample_names(family) for family in FAMILIES))
    used = metric_names_in_dashboard(prefix="ourvidz_")
    assert used - exported == set()


def test_every_family_is_shown_by_a_panel():
    used = metric_names_in_dashboard()
    assert [family.name for family in FAMILIES if not sample_names(family) & used] == []


def test_counters_and_buckets_are_read_through_rate_or_increase(dashboard):
    cumulative = {
        name
        for family in FAMILIES
        if family.kind is not Kind.GAUGE
        for name in sample_names(family)
    } | {"ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total"}
    for expr in exprs(dashboard):
        for name in promql_metric_names(expr) & cumulative:
            bare = re.findall(rf"(\w*)\(\s*{name}\b", expr)
            assert bare and set(bare) <= {"rate", "irate", "increase"}, expr


def test_quantiles_keep_the_bucket_label(dashboard):
    for expr in exprs(dashboard):
        if "histogram_quantile" in expr:
            grouping = re.search(r"histogram_quantile\([\d.]+, sum by \(([^)]*)\)", expr)
            assert grouping and "le" in grouping[1].replace(" ", "").split(","), expr


def test_metric_names_in_dashboard_separates_our_names_from_ray_serve():
    names = metric_names_in_dashboard()
    own = metric_names_in_dashboard(prefix="ourvidz_")
    ray = metric_names_in_dashboard(prefix="ray_")
    assert own and ray and own | ray == names and not own & ray
    assert {"ourvidz_generation_seconds_bucket", "ourvidz_jobs_finished_total"} <= own
    assert "ray_serve_num_http_requests_total" in ray


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ("rate(foo_total[5m])", {"foo_total"}),
        (
            'histogram_quantile(0.95, sum by (le, job_type) (rate(a_bucket{job_type=~"$job_type"}'
            "[$__rate_interval])))",
            {"a_bucket"},
        ),
        (
            "sum without (instance) (rate(x_sum[5m])) / ignoring(le) group_left(model) "
            "sum(rate(x_count[1h30m] offset 5m))",
            {"x_sum", "x_count"},
        ),
        ("a > bool 0.5e3 and on (job) b:recorded unless c", {"a", "b:recorded", "c"}),
        ('label_replace(m, "dst", "$1", "src", "(by|sum)")', {"m"}),
        ("sum (m) by (le) + max(n) / inf", {"m", "n"}),
        ("rate (spaced [5m])", {"spaced"}),
        ("topk(5, g @ end())", {"g"}),
        ("vector(1) - scalar(time())  # not_a_metric here", set()),
    ],
)
def test_promql_metric_names_reads_names_not_functions_labels_or_durations(expr, names):
    assert promql_metric_names(expr) == names


def test_provisioning_loads_the_dashboard_from_its_folder_with_its_datasource(dashboard):
    providers = yaml.safe_load((PROVISIONING / "dashboards.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    assert folder.startswith("/")

    datasources = yaml.safe_load((PROVISIONING / "datasource.yaml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"].startswith("http")
    assert variable(dashboard, "datasource")["current"]["value"] == source["uid"]

    # The README's instructions mount the JSON in the provider's folder and both snippets.
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Grafana dashboard\n", 1)[1].split("\n## ", 1)[0]
    assert f"dashboards/ourvidz.json:{folder}/ourvidz.json" in section
    assert "dashboards/provisioning/dashboards.yaml:/etc/grafana/provisioning/dashboards/" in (
        section
    )
    assert "dashboards/provisioning/datasource.yaml:/etc/grafana/provisioning/datasources/" in (
        section
    )
