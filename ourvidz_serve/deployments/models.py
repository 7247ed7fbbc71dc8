"""Model deployments. SDXL and WAN replicas are queue workers; the enhancer answers calls.

Each SDXL and WAN replica opens its own pool and storage and runs a
:class:`~ourvidz_serve.workers.worker.QueueWorker` around its pipeline runner: it claims jobs
from PostgreSQL up to its free capacity, so the replica holding a job is the one running it.
Serve stops a replica (scale-down, redeploy) through ``__del__``, which finishes what fits in
the grace period and releases the rest to the queue. The runners know nothing of Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack

from ray import serve
from ray.serve.handle import DeploymentHandle

from ourvidz_serve.catalog import Queue
from ourvidz_serve.deployments.autoscaling import BACKLOG_METRIC, RUNNING_METRIC
from ourvidz_serve.deployments.client import RayEnhancer
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult
from ourvidz_serve.redaction import install_log_redaction
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage, create_storage
from ourvidz_serve.workers.callbacks import deliverer_from_settings
from ourvidz_serve.workers.handlers import JobHandler
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig


def _worker_id(deployment: str) -> str:
    """Who holds a lease: replica, host and process, so an operator can find it."""
    replica = serve.get_replica_context().replica_id.unique_id
    return f"{deployment}:{replica}@{socket.gethostname()}:{os.getpid()}"


class _QueueWorkerReplica:
    """Opens the pool and storage and runs one queue worker for the replica's lifetime."""

    _deployment: str
    _queue: Queue

    async def _start_worker(
        self, settings: Settings, handler_for: Callable[[Storage], JobHandler]
    ) -> None:
        install_log_redaction(settings.secrets())
        self._stack = AsyncExitStack()
        self._worker: QueueWorker | None = None
        pool = await self._stack.enter_async_context(open_database(settings))
        storage = create_storage(settings)
        await storage.start()
        self._stack.push_async_callback(storage.close)
        # Callbacks are delivered by every replica with a pool (claims use SKIP LOCKED).
        deliverer = deliverer_from_settings(JobRepository(pool), settings)
        if deliverer is not None:
            delivering = asyncio.create_task(deliverer.run(), name="callbacks")
            self._stack.push_async_callback(_stop_task, delivering)
        if settings.workers_enabled:
            self._worker = QueueWorker(
                JobRepository(pool),
                storage,
                handler_for(storage),
                WorkerConfig.for_queue(settings, self._queue),
                _worker_id(self._deployment),
            )
            await self._worker.start()
            self._stack.push_async_callback(self._worker.stop)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The queue's backlog and this replica's running units, for the backlog policy."""
        backlog, running = self._worker.load() if self._worker is not None else (0, 0)
        # Always numbers: Serve turns custom metrics off for good if the first answer is not.
        return {BACKLOG_METRIC: float(backlog), RUNNING_METRIC: float(running)}

    def ready(self) -> str:
        return "ok"

    async def __del__(self) -> None:
        stack = getattr(self, "_stack", None)  # absent when __init__ failed early
        if stack is not None:
            await stack.aclose()


@serve.deployment(name="SDXL")
class SDXLDeployment(_QueueWorkerReplica):
    """SDXL text-to-image and image-to-image; one pipeline call per claimed batch."""

    _deployment, _queue = "SDXL", Queue.SDXL

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
        from ourvidz_serve.workers.handlers import SDXLJobHandler

        runner = await asyncio.to_thread(SDXLPipelineRunner.build, settings)
        await self._start_worker(settings, lambda storage: SDXLJobHandler(runner, storage))


@serve.deployment(name="WAN")
class WanDeployment(_QueueWorkerReplica):
    """WAN 2.1 text-to-video and text-to-image; enhanced types ask the enhancer first."""

    _deployment, _queue = "WAN", Queue.WAN

    async def __init__(  # type: ignore[misc]
        self, settings: Settings, enhancer: DeploymentHandle
    ) -> None:
        from ourvidz_serve.pipelines.wan import WanPipelineRunner
        from ourvidz_serve.security.prompt_policy import PromptPolicy
        from ourvidz_serve.workers.handlers import WanJobHandler

        runner = await asyncio.to_thread(WanPipelineRunner.build, settings)
        policy = PromptPolicy.from_settings(settings)
        await self._start_worker(
            settings, lambda _storage: WanJobHandler(runner, RayEnhancer(enhancer), policy)
        )


@serve.deployment(name="Enhancer")
class EnhancerDeployment:
    """Qwen2.5 prompt enhancement; concurrent prompts share one ``generate`` call."""

    def __init__(self, settings: Settings) -> None:
        from ourvidz_serve.pipelines.qwen import QwenEnhancerRunner

        self._runner = QwenEnhancerRunner.build(settings)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _enhance_batch(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        return await asyncio.to_thread(self._runner.enhance, requests)

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        return list(await asyncio.gather(*(self._enhance_batch(r) for r in requests)))

    def ready(self) -> str:
        return "ok"


async def _stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
