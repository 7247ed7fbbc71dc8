"""Model deployments. SDXL and WAN replicas are queue workers; the enhancer answers calls.

Each SDXL and WAN replica opens its own pool and storage and runs a
:class:`~ourvidz_serve.workers.worker.QueueWorker` around its pipeline runner: it claims jobs
from PostgreSQL up to its free capacity, so the replica holding a job is the one running it.
Serve stops a replica (scale-down, redeploy) through ``__del__``, which finishes what fits in
the grace period and releases the rest to the queue. The runners know nothing of Ray.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from ourvidz_serve.catalog import Queue
from ourvidz_serve.deployments.autoscaling import BACKLOG_METRIC, RUNNING_METRIC
from ourvidz_serve.deployments.client import RayEnhancer
from ourvidz_serve.deployments.metrics import ray_metrics_recorder
from ourvidz_serve.observability.metrics import Metrics
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult
from ourvidz_serve.redaction import install_log_redaction
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage, create_storage
from ourvidz_serve.workers.callbacks import deliverer_from_settings
from ourvidz_serve.workers.handlers import JobHandler, SDXLJobHandler
from ourvidz_serve.workers.retention import RetentionSweeper
from ourvidz_serve.workers.supervision import HealthCheck, ReplicaUnhealthy, Supervisor
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig

if TYPE_CHECKING:
    # Imported by the replica itself (torch and diffusers load there, not in the ingress).
    from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner


def _worker_id(deployment: str) -> str:
    """Who holds a lease: replica, host and process, so an operator can find it."""
    replica = serve.get_replica_context().replica_id.unique_id
    return f"{deployment}:{replica}@{socket.gethostname()}:{os.getpid()}"


class _QueueWorkerReplica:
    """Opens the pool and storage and runs one queue worker for the replica's lifetime."""

    _deployment: str
    _queue: Queue
    _runner: ModelRunner
    _gpu_share: dict[str, Any]

    async def _start_worker(
        self, settings: Settings, handler_for: Callable[[Storage, Metrics], JobHandler]
    ) -> None:
        install_log_redaction(settings.secrets())
        self._stack = AsyncExitStack()
        self._worker: QueueWorker | None = None
        # One supervisor for every background loop of the replica (the worker's and the
        # callback deliverer's); check_health reports a loop that keeps failing.
        self._supervisor = Supervisor(
            restart_max_s=settings.loop_restart_max_s, stall_s=settings.loop_stall_s
        )
        metrics = ray_metrics_recorder()
        self._supervisor.every(
            "gpu-memory",
            GPU_MEMORY_REPORT_S,
            gpu_memory_reporter(metrics, self._deployment, runner=self._runner),
        )
        pool = await self._stack.enter_async_context(open_database(settings))
        self._repository = JobRepository(
            pool,
            direct_dsn=settings.database_direct_url,
            acquire_timeout_s=settings.db_acquire_timeout_s,
        )
        self._health = HealthCheck(
            self._repository.ping,
            timeout_s=settings.health_db_timeout_s,
            outage_s=settings.loop_stall_s,
        )
        storage = create_storage(settings)
        await storage.start()
        self._stack.push_async_callback(storage.close)
        # Callbacks are delivered by every replica with a pool (claims use SKIP LOCKED).
        deliverer = deliverer_from_settings(self._repository, settings, metrics)
        if deliverer is not None:
            self._stack.push_async_callback(deliverer.aclose)
            self._supervisor.every("callbacks", 0, deliverer.round)
        # Retention (OURVIDZ_RETENTION_DAYS): every replica sweeps, batches are SKIP LOCKED.
        sweeper = RetentionSweeper.from_settings(self._repository, storage, settings)
        if sweeper is not None:
            interval = settings.retention_sweep_interval_s
            self._supervisor.every("retention", interval, sweeper.round)
        # Stopped before the client, storage and pool they use are closed (LIFO).
        self._stack.push_async_callback(self._supervisor.stop)
        if settings.workers_enabled:
            self._worker = QueueWorker(
                self._repository,
                storage,
                handler_for(storage, metrics),
                dataclasses.replace(
                    WorkerConfig.for_queue(settings, self._queue), gpu_share=_charged_gpu_share()
                ),
                _worker_id(self._deployment),
                metrics,
                self._supervisor,
            )
            await self._worker.start()
            worker = self._worker
            # A replica stopped after failing its health check keeps its jobs' attempts.
            self._stack.push_async_callback(lambda: worker.stop(give_back=not self._health.failed))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The queue's backlog and this replica's running units, for the backlog policy."""
        backlog, running = self._worker.load() if self._worker is not None else (0, 0)
        # Always numbers: Serve turns custom metrics off for good if the first answer is not.
        return {BACKLOG_METRIC: float(backlog), RUNNING_METRIC: float(running)}

    def ready(self) -> dict[str, Any]:
        return replica_report(self._runner, self._gpu_share) | {"loops": self._supervisor.report()}

    async def check_health(self) -> None:
        """Serve's health check: raises (and Serve replaces the replica, whose shutdown
        releases its jobs) when a background loop died, keeps failing with a bug or hangs,
        held leases are not being renewed, or the pool has not answered for longer than a
        short outage."""
        leases = self._worker.lease_problems if self._worker is not None else list
        await self._health.check(self._supervisor.problems(), leases)

    async def __del__(self) -> None:
        stack = getattr(self, "_stack", None)  # absent when __init__ failed early
        if stack is not None:
            await stack.aclose()


@serve.deployment(name="SDXL")
class SDXLDeployment(_QueueWorkerReplica):
    """SDXL text-to-image and image-to-image; one pipeline call per claimed batch."""

    _deployment, _queue = "SDXL", Queue.SDXL
    _sdxl: SDXLPipelineRunner

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner

        runner, self._gpu_share = await asyncio.to_thread(
            build_checked, self._deployment, settings, SDXLPipelineRunner.build
        )
        self._runner = self._sdxl = runner

        def handler(storage: Storage, metrics: Metrics) -> SDXLJobHandler:
            self._handler = SDXLJobHandler(runner, storage, metrics)
            return self._handler

        await self._start_worker(settings, handler)

    def ready(self) -> dict[str, Any]:
        """The replica's report, with the LoRAs it holds (``/readyz`` lists them)."""
        handler: SDXLJobHandler | None = getattr(self, "_handler", None)
        resident = handler.resident_loras() if handler is not None else []
        stats = self._sdxl.lora_stats.as_dict()
        return super().ready() | {"loras": {"resident": resident, **stats}}


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

        runner, self._gpu_share = await asyncio.to_thread(
            build_checked, self._deployment, settings, WanPipelineRunner.build
        )
        self._runner = runner
        policy = PromptPolicy.from_settings(settings)
        await self._start_worker(
            settings,
            lambda _storage, metrics: WanJobHandler(
                runner,
                RayEnhancer(enhancer),
                policy,
                step_caches=settings.wan_step_cache,
                metrics=metrics,
            ),
        )


@serve.deployment(name="Enhancer")
class EnhancerDeployment:
    """Qwen2.5 prompt enhancement; concurrent prompts share one ``generate`` call."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        from ourvidz_serve.pipelines.qwen import QwenEnhancerRunner

        self._runner, self._gpu_share = await asyncio.to_thread(
            build_checked, "Enhancer", settings, QwenEnhancerRunner.build
        )
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=256)
        self._metrics = ray_metrics_recorder()
        self._waiting = 0
        """Prompts in or waiting for a batch (the ``enhance`` queue length)."""
        self._metrics.enhance_queue(0)
        # Its one background loop, supervised like every other replica's.
        self._supervisor = Supervisor(
            restart_max_s=settings.loop_restart_max_s, stall_s=settings.loop_stall_s
        )
        self._supervisor.every(
            "gpu-memory",
            GPU_MEMORY_REPORT_S,
            gpu_memory_reporter(self._metrics, "Enhancer", runner=self._runner),
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _enhance_batch(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        self._batch_sizes.append(len(requests))
        return await asyncio.to_thread(self._runner.enhance_or_fallback, requests)

    def check_health(self) -> None:
        """Serve's health check: its background loop is not failing. The enhancer has no
        pool, and a failing ``generate`` falls back per call instead."""
        problems = self._supervisor.problems()
        if problems:
            raise ReplicaUnhealthy("; ".join(problems))

    def recent_batch_sizes(self) -> list[int]:
        """Prompts per ``generate`` call, most recent last (for tests and diagnosis)."""
        return list(self._batch_sizes)

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        """Enhance one caller's prompts, batched with every other caller's.

        Each caller's requests are validated before they join a batch, so a bad request
        fails its own call alone (as SDXL validates each job before its batch call).
        """
        self._runner.validate(requests)
        self._waiting += len(requests)
        self._metrics.enhance_queue(self._waiting)
        try:
            return list(await asyncio.gather(*(self._enhance_batch(r) for r in requests)))
        finally:
            self._waiting -= len(requests)
            self._metrics.enhance_queue(self._waiting)

    def ready(self) -> dict[str, Any]:
        return replica_report(self._runner, self._gpu_share) | {"loops": self._supervisor.report()}


class ModelRunner(Protocol):
    device: Any
    acceleration: dict[str, Any]


Runner = TypeVar("Runner", bound=ModelRunner)


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def build_checked(
    deployment: str, settings: Settings, build: Callable[[Settings], Runner]
) -> tuple[Runner, dict[str, Any]]:
    """Check the replica's GPU share against the memory plan, then build its runner.

    A share too small for the model's weights fails the replica here, naming both figures,
    instead of an out-of-memory error later in whichever replica shares the GPU. One thread
    does both: the plan's meta-device builds set torch's default dtype while they run.
    """
    from ourvidz_serve.pipelines.memory_plan import check_replica_share

    # Before minutes of loading: a replica on a second node must not start a second database.
    settings.check_cluster_size(alive_nodes())
    num_gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    share = check_replica_share(deployment, settings, num_gpus)
    return build(settings), share


def _charged_gpu_share() -> float:
    """The GPUs this replica was given; on a CPU, the device counts as one whole GPU, so that
    quotas charge what ran there too."""
    num_gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    return num_gpus if num_gpus > 0 else 1.0


GPU_MEMORY_REPORT_S = 10.0


def gpu_memory_reporter(
    metrics: Metrics, deployment: str, *, runner: ModelRunner
) -> Callable[[], Awaitable[None]]:
    """One round of recording the replica's GPU memory in use and total (a supervised loop
    runs it every ``GPU_MEMORY_REPORT_S``)."""
    from ourvidz_serve.pipelines.memory_plan import gpu_memory_report

    replica = serve.get_replica_context().replica_id.unique_id

    async def report() -> None:
        report = gpu_memory_report(runner.device)
        used, total = report.get("used_bytes") or 0, report.get("total_bytes") or 0
        metrics.gpu_memory(deployment, replica, int(used), int(total))

    return report


def replica_report(runner: ModelRunner, gpu_share: dict[str, Any]) -> dict[str, Any]:
    """A replica's readiness answer: where Ray placed it, its GPU memory and settings."""
    from ourvidz_serve.pipelines.memory_plan import gpu_memory_report

    context = ray.get_runtime_context()
    return {
        "status": "ok",
        "node_id": context.get_node_id(),
        "gpu_ids": context.get_accelerator_ids().get("GPU", []),
        "resources": context.get_assigned_resources(),
        "gpu_memory": gpu_memory_report(runner.device),
        "gpu_share": gpu_share,
        "acceleration": runner.acceleration,
    }
