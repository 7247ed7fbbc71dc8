"""A queue worker in a process of its own, for tests that pause it with SIGSTOP.

``python -m tests.support.paused_worker DATABASE_URL DATA_DIR PAYLOAD``: claims SDXL jobs under
2-second leases and "generates" ``PAYLOAD`` for every image. Before each upload it prints
``UPLOADING <key>`` and waits a second, so that a test can stop it mid-upload; the worker's log
goes to stdout too.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ourvidz_serve.catalog import Queue
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import JobRecord, JobRepository
from ourvidz_serve.pipelines.base import EncodedAsset
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage, create_storage
from ourvidz_serve.workers.handlers import Generated, JobResult
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig


class AnnouncingStorage:
    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        print(f"UPLOADING {key}", flush=True)
        await asyncio.sleep(1.0)
        await self._inner.put(bucket, key, data, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class PayloadHandler:
    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    async def run(self, jobs: Sequence[JobRecord], control: Any = None) -> list[JobResult]:
        return [
            Generated(
                outputs=[
                    EncodedAsset(self._payload, "image/png", int(a.metadata["seed"]), 32, 32)
                    for a in job.assets
                ],
                prompt=job.prompt,
                generation_time=0.01,
            )
            for job in jobs
        ]


async def main(database_url: str, data_dir: Path, payload: bytes) -> None:
    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        api_keys=["test-service-key"],
        lease_s=2.0,
        heartbeat_interval_s=0.5,
        reaper_interval_s=3600,
        queue_poll_interval_s=0.1,
    )
    async with open_database(settings) as pool:
        storage = create_storage(settings)
        await storage.start()
        config = WorkerConfig.for_queue(settings, Queue.SDXL)
        worker = QueueWorker(
            JobRepository(pool),
            AnnouncingStorage(storage),  # type: ignore[arg-type]
            PayloadHandler(payload),
            config,
            "paused-worker",
        )
        await worker.start()
        print("STARTED", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3].encode()))
