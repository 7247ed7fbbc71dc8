"""The ingress reads Ray's metrics export of every node, so a scrape counts every replica."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ourvidz_serve.deployments.metrics import RayClusterFeed
from ourvidz_serve.observability.exposition import recorded_families
from tests.moto_server import closed_loopback_url


def node_export(node: str, completed: int) -> str:
    """What Ray's agent on one node exports: one series per process, Ray's labels on each."""
    return (
        "# HELP ray_ourvidz_jobs_finished_total Jobs that reached a final state.\n"
        "# TYPE ray_ourvidz_jobs_finished_total counter\n"
        f'ray_ourvidz_jobs_finished_total{{NodeAddress="{node}",WorkerId="w1",'
        f'job_type="sdxl_image_fast",status="completed"}} {completed}.0\n'
        "# HELP ray_serve_num_http_requests_total Serve's own.\n"
        "# TYPE ray_serve_num_http_requests_total counter\n"
        f'ray_serve_num_http_requests_total{{NodeAddress="{node}"}} 7.0\n'
    )


@contextlib.contextmanager
def exporting(text: str) -> Iterator[str]:
    body = text.encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def finished_counts(text: str) -> dict[tuple[tuple[str, str], ...], float]:
    [family] = [f for f in recorded_families(text) if f.name == "ourvidz_jobs_finished"]
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


async def test_a_scrape_adds_up_the_replicas_of_every_node() -> None:
    with (
        exporting(node_export("10.0.0.1", 3)) as head,
        exporting(node_export("10.0.0.2", 4)) as gpu,
    ):
        text = await RayClusterFeed(lambda: [head, gpu]).exported()
    counts = finished_counts(text)
    assert counts == {(("job_type", "sdxl_image_fast"), ("status", "completed")): 7.0}


async def test_a_node_that_does_not_answer_leaves_the_others_counted(caplog) -> None:
    silent = closed_loopback_url() + "/metrics"
    with exporting(node_export("10.0.0.1", 3)) as head:
        text = await RayClusterFeed(lambda: [silent, head]).exported()
    assert finished_counts(text) == {
        (("job_type", "sdxl_image_fast"), ("status", "completed")): 3.0
    }
    assert any(silent in record.getMessage() for record in caplog.records)


async def test_the_node_list_is_read_at_every_scrape() -> None:
    nodes: list[str] = []
    feed = RayClusterFeed(lambda: list(nodes))
    with (
        exporting(node_export("10.0.0.1", 2)) as head,
        exporting(node_export("10.0.0.2", 5)) as new,
    ):
        nodes.append(head)
        assert sum(finished_counts(await feed.exported()).values()) == 2
        nodes.append(new)  # the autoscaler added a node
        assert sum(finished_counts(await feed.exported()).values()) == 7
