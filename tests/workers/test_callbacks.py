"""Callbacks end to end in-process: the outbox written with the job's end, deliveries signed by
the Standard Webhooks scheme (verified by the library in a loopback receiver), retries held in
the database across a restart, and a slow receiver that delays nothing but itself."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jsonschema
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from ourvidz_serve.api.app import create_app
from ourvidz_serve.settings import Settings
from ourvidz_serve.workers.callbacks import CallbackSigner, RetryPolicy
from tests.conftest import TEST_API_KEY
from tests.inprocess import InProcessModels, TinyRunners, running_workers
from tests.launcher import free_loopback_port
from tests.support.waiting import until
from tests.support.webhook_receiver import webhook_receiver

SECRET = "whsec_" + base64.b64encode(b"callback-secret-for-the-tests-01").decode()
HEADERS = {"Authorization": f"Bearer {TEST_API_KEY}"}
USER = "6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11"
SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "callback.schema.json").read_text()
)


def test_every_secret_signs_so_a_receiver_with_any_one_verifies():
    old = "whsec_" + base64.b64encode(b"old-secret-old-secret-old-secret").decode()
    signer = CallbackSigner.from_setting(f"{SECRET}, {old}")
    body = json.dumps({"job_id": "x"})
    headers = signer.headers("job-1.completed", body, datetime.now(UTC))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, old):
        assert Webhook(secret).verify(body, headers) == {"job_id": "x"}
    plain = CallbackSigner.from_setting("a plain secret, not base64")
    signed = plain.headers("id", body, datetime.now(UTC))
    assert Webhook(b"a plain secret").verify(body, signed) == {"job_id": "x"}


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap():
    policy = RetryPolicy(max_attempts=12, base_s=2.0, max_s=60.0)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (6, 60.0), (11, 60.0)]:
        delays = [policy.delay_s(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered


def callback_settings(settings: Settings, receiver_url: str) -> Settings:
    return settings.model_copy(
        update={
            "callback_url": receiver_url,
            "callback_secret": SecretStr(SECRET),
            "callback_retry_base_s": 0.2,
            "callback_retry_max_s": 0.5,
            "callback_poll_interval_s": 0.1,
            "callback_timeout_s": 2.0,
        }
    )


@contextlib.asynccontextmanager
async def service(
    settings: Settings, runners: TinyRunners, workers: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, InProcessModels(runners.enhancer))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        if workers:
            await stack.enter_async_context(running_workers(settings, runners))
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", headers=HEADERS
        )
        yield await stack.enter_async_context(client)


async def submit(client: httpx.AsyncClient, **fields) -> str:
    body = {"job_type": "sdxl_image_fast", "prompt": "a red kite", "user_id": USER} | fields
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def delivered_job(client: httpx.AsyncClient, job_id: str) -> dict | None:
    body = (await client.get(f"/v1/jobs/{job_id}")).json()
    callbacks = body["callbacks"]
    return body if callbacks and callbacks[0]["status"] == "delivered" else None


async def test_a_finished_job_is_delivered_signed_once_with_its_record(
    settings, repository, tiny_runners
):
    with webhook_receiver(SECRET) as receiver:
        async with service(callback_settings(settings, receiver.url), tiny_runners) as client:
            job_id = await submit(client, num_images=3)
            job = await until(lambda: delivered_job(client, job_id), what="delivery")
    [delivery] = receiver.deliveries
    assert delivery["verified"]
    payload = delivery["payload"]
    jsonschema.validate(payload, SCHEMA)
    assert payload["job_id"] == job_id and payload["status"] == "completed"
    assert payload["assets"] == [asset["path"] for asset in job["assets"]]
    assert payload["error_message"] is None
    assert delivery["headers"]["webhook-id"] == f"{job_id}.completed"
    [record] = job["callbacks"]
    assert record["event"] == "job.completed" and record["attempts"] == 1
    assert record["history"][0]["status_code"] == 200
    assert record["history"][0]["duration_s"] >= 0


async def test_a_receiver_answering_500_gets_it_on_a_later_attempt_with_every_attempt_kept(
    settings, repository, tiny_runners
):
    with webhook_receiver(SECRET, answers=[500, 503]) as receiver:
        async with service(callback_settings(settings, receiver.url), tiny_runners) as client:
            job_id = await submit(client)
            job = await until(lambda: delivered_job(client, job_id), what="delivery")
    assert [d["verified"] for d in receiver.deliveries] == [True, True, True]
    assert {d["headers"]["webhook-id"] for d in receiver.deliveries} == {f"{job_id}.completed"}
    [record] = job["callbacks"]
    assert [a["status_code"] for a in record["history"]] == [500, 503, 200]
    assert record["attempts"] == 3 and job["status"] == "completed"


async def test_a_receiver_down_across_a_restart_still_gets_the_callback(
    settings, repository, tiny_runners
):
    port = free_loopback_port()
    configured = callback_settings(settings, f"http://127.0.0.1:{port}/hooks")
    async with service(configured, tiny_runners) as client:
        job_id = await submit(client)

        async def failed_twice() -> bool:
            body = (await client.get(f"/v1/jobs/{job_id}")).json()
            return bool(body["callbacks"]) and len(body["callbacks"][0]["history"]) >= 2

        await until(failed_twice, what="two failed attempts")
    # The service is down; the delivery owed waits in the database.
    with webhook_receiver(SECRET, port=port) as receiver:
        async with service(configured, tiny_runners, workers=False) as client:
            job = await until(lambda: delivered_job(client, job_id), what="delivery")
    assert [d["verified"] for d in receiver.deliveries] == [True]
    history = job["callbacks"][0]["history"]
    assert all("error" in attempt for attempt in history[:-1]) and len(history) >= 3
    assert history[-1]["status_code"] == 200


async def test_a_slow_receiver_does_not_delay_the_jobs_completion(
    settings, repository, tiny_runners
):
    with webhook_receiver(SECRET, delay_s=3.0) as receiver:
        configured = callback_settings(settings, receiver.url).model_copy(
            update={"callback_timeout_s": 10.0}
        )
        async with service(configured, tiny_runners) as client:
            first = await submit(client)
            await until(lambda: _true(receiver.deliveries), what="the first delivery arriving")
            # While the receiver sits on the first callback, the next job runs and ends.
            started = time.monotonic()
            second = await submit(client, prompt="a blue kite")

            async def completed() -> bool:
                body = (await client.get(f"/v1/jobs/{second}")).json()
                return body["status"] == "completed"

            await until(completed, what="the second job completed")
            took = time.monotonic() - started
            await until(lambda: delivered_job(client, first), what="the first delivery")
    assert took < 3.0, "the job waited for the receiver"


async def test_without_a_callback_url_no_delivery_is_owed(settings, repository, tiny_runners, pool):
    async with service(settings, tiny_runners) as client:
        job_id = await submit(client)

        async def done() -> bool:
            return (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"

        await until(done, what="completion")
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["callbacks"] == []
    assert await pool.fetchval("SELECT count(*) FROM callback_deliveries") == 0


async def _true(value: object) -> bool:
    return bool(value)
