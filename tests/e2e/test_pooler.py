"""The session service behind PgBouncer in transaction mode (Supabase's port 6543): every job
type, a cancel, an SSE stream and a signed callback per finished job, with the replicas' pooled
statements going through the pooler and only LISTEN on direct sessions."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from ourvidz_serve.catalog import JOB_TYPES
from tests.e2e.conftest import ServiceDatabase
from tests.e2e.test_job_control import sse_events
from tests.e2e.test_serve_lifecycle import finished, submit
from tests.support.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e


async def test_every_job_type_a_cancel_events_and_callbacks_through_a_transaction_pooler(
    http: httpx.AsyncClient,
    service_db: asyncpg.Connection,
    service_database: ServiceDatabase,
    callback_receiver: Receiver,
):
    pooler = service_database.pooler
    queries_before = pooler.stats().get("total_query_count", 0)

    # Everything at once: the ten types, an SSE stream, and a video cancelled behind them.
    submitted = await asyncio.gather(*(submit(http, job_type=name) for name in JOB_TYPES))
    stream = asyncio.create_task(sse_events(http, submitted[0]["id"]))
    doomed = await submit(http, job_type="video_high")
    cancel = await http.delete(f"/v1/jobs/{doomed['id']}")
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["status"] == "cancelled"

    results = await asyncio.gather(*(finished(http, job["id"]) for job in submitted))
    assert {job["job_type"]: job["status"] for job in results} == dict.fromkeys(
        JOB_TYPES, "completed"
    ), [(job["job_type"], job["error_message"]) for job in results]
    events = await asyncio.wait_for(stream, 120)
    assert events[-1] == ("status", {"status": "completed"}), events

    # One signed callback per finished job (the cancelled one included), by its webhook-id.
    ended = {job["id"]: job for job in [*results, (await finished(http, doomed["id"]))]}
    wanted = {f"{job_id}.{job['status']}" for job_id, job in ended.items()}

    def arrived() -> dict[str, dict]:
        return {
            d["headers"]["webhook-id"]: d
            for d in callback_receiver.verified()
            if d["headers"]["webhook-id"] in wanted
        }

    deadline = time.monotonic() + 60
    while set(arrived()) != wanted:
        assert time.monotonic() < deadline, sorted(wanted - set(arrived()))
        await asyncio.sleep(0.2)
    for delivery in arrived().values():
        payload = delivery["payload"]
        job = ended[payload["job_id"]]
        assert payload["status"] == job["status"]
        assert payload["assets"] == [asset["path"] for asset in job["assets"]]

    # The replicas' pools went through PgBouncer; the only sessions of theirs on the server
    # itself are the LISTEN ones (one per ingress and worker replica).
    assert pooler.stats()["total_query_count"] > queries_before
    activity = await service_db.fetch(
        "SELECT pid, query FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )
    servers = pooler.server_pids()
    # A session that has run no statement yet ('') is one being opened (a LISTEN reconnecting,
    # or PgBouncer opening a server connection after server_pids() was read).
    direct = [row["query"] for row in activity if row["pid"] not in servers and row["query"]]
    assert direct and all(query.startswith("LISTEN ") for query in direct), direct
    assert len(direct) >= 4  # two ingress replicas (SSE events), the SDXL and WAN workers
    assert any(row["pid"] in servers for row in activity)
