"""The worker layer without Ray: tiny pipeline runners behind in-process queue workers.

The same QueueWorker and handlers the Serve replicas run, over the tests' real PostgreSQL and
storage; only the Serve deployment shell around them is absent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from ourvidz_serve.catalog import Queue
from ourvidz_serve.observability.metrics import NO_METRICS, Metrics
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult
from ourvidz_serve.pipelines.qwen import QwenEnhancerRunner
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.pipelines.wan import WanPipelineRunner
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage, create_storage
from ourvidz_serve.workers.handlers import JobHandler, SDXLJobHandler, WanJobHandler
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig


@dataclass(frozen=True)
class TinyRunners:
    sdxl: SDXLPipelineRunner
    wan: WanPipelineRunner
    enhancer: QwenEnhancerRunner

    @classmethod
    def build(cls) -> TinyRunners:
        settings = Settings()
        return cls(
            SDXLPipelineRunner.build(settings),
            WanPipelineRunner.build(settings),
            QwenEnhancerRunner.build(settings),
        )


class InProcessModels:
    """The ingress's ModelClient over the tiny enhancer in a thread."""

    def __init__(self, enhancer: QwenEnhancerRunner) -> None:
        self._enhancer = enhancer
        self._lock = asyncio.Lock()

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        # As the Enhancer deployment: each caller validated alone, then one batched call.
        self._enhancer.validate(requests)
        async with self._lock:
            return await asyncio.to_thread(self._enhancer.enhance_or_fallback, requests)

    async def check(self) -> dict[str, str]:
        return {"sdxl": "ok", "wan": "ok", "enhancer": "ok"}

    async def replicas(self) -> dict[str, int]:
        return {"sdxl_queue": 1, "wan_queue": 1}  # the in-process workers: one per queue


def handler_for(
    queue: Queue, runners: TinyRunners, storage: Storage, metrics: Metrics = NO_METRICS
) -> JobHandler:
    if queue is Queue.SDXL:
        return SDXLJobHandler(runners.sdxl, storage, metrics)
    return WanJobHandler(runners.wan, InProcessModels(runners.enhancer), metrics=metrics)


@asynccontextmanager
async def running_workers(
    settings: Settings,
    runners: TinyRunners,
    queues: tuple[Queue, ...] = (Queue.SDXL, Queue.WAN),
    storage: Storage | None = None,
    name: str = "inprocess",
    metrics: Metrics = NO_METRICS,
) -> AsyncIterator[list[QueueWorker]]:
    """Queue workers for ``queues`` with their own pool, started and stopped around the block."""
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(open_database(settings))
        if storage is None:
            storage = create_storage(settings)
            await storage.start()
            stack.push_async_callback(storage.close)
        repository = JobRepository(pool, direct_dsn=settings.database_direct_url)
        workers = [
            QueueWorker(
                repository,
                storage,
                handler_for(queue, runners, storage, metrics),
                WorkerConfig.for_queue(settings, queue),
                f"{name}-{queue.value}",
                metrics,
            )
            for queue in queues
        ]
        for worker in workers:
            await worker.start()
            stack.push_async_callback(worker.stop)
        yield workers
