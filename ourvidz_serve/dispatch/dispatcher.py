"""The dispatcher: claims queued jobs from PostgreSQL up to each queue's capacity.

One dispatcher runs in every ingress replica. Submissions ``NOTIFY`` the queue's name, which
wakes the dispatcher at once; a poll interval covers missed notifications. Jobs beyond the
capacity stay ``queued`` in the database, not in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import asyncpg

from ourvidz_serve.persistence.repository import NOTIFY_CHANNEL, JobRecord, JobRepository

logger = logging.getLogger(__name__)

JobRunner = Callable[[JobRecord], Coroutine[Any, Any, None]]


class Dispatcher:
    def __init__(
        self,
        repository: JobRepository,
        run_job: JobRunner,
        capacities: Mapping[str, int],
        poll_interval_s: float,
    ) -> None:
        self._repository = repository
        self._run_job = run_job
        self._capacities = dict(capacities)
        self._poll_interval_s = poll_interval_s
        self._wake = {queue: asyncio.Event() for queue in self._capacities}
        self._running: dict[str, set[asyncio.Task[None]]] = {q: set() for q in self._capacities}
        self._loops: list[asyncio.Task[None]] = []
        self._listener: asyncpg.pool.PoolConnectionProxy | None = None

    async def start(self) -> None:
        self._listener = await self._repository.pool.acquire()
        await self._listener.add_listener(NOTIFY_CHANNEL, self._on_notify)
        self._loops = [
            asyncio.create_task(self._queue_loop(queue), name=f"dispatch-{queue}")
            for queue in self._capacities
        ]

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming; give running jobs ``grace_s`` to finish, then cancel them."""
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        running = [task for tasks in self._running.values() for task in tasks]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._listener is not None:
            await self._listener.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            await self._repository.pool.release(self._listener)
            self._listener = None

    def in_flight(self) -> dict[str, int]:
        return {queue: len(tasks) for queue, tasks in self._running.items()}

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload in self._wake:
            self._wake[payload].set()

    async def _queue_loop(self, queue: str) -> None:
        wake, running, capacity = self._wake[queue], self._running[queue], self._capacities[queue]
        while True:
            wake.clear()
            free = capacity - len(running)
            claimed: list[JobRecord] = []
            if free > 0:
                try:
                    claimed = await self._repository.claim_jobs(queue, free)
                except Exception:
                    # The loop must outlive a lost connection or a bad row: log, wait, retry.
                    logger.exception(
                        "claiming from %s failed; retrying after the poll interval", queue
                    )
            for job in claimed:
                task = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")
                running.add(task)
                task.add_done_callback(functools.partial(self._job_done, queue))
            if claimed and len(claimed) == free:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=self._poll_interval_s)

    def _job_done(self, queue: str, task: asyncio.Task[None]) -> None:
        self._running[queue].discard(task)
        self._wake[queue].set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("job task ended with an error", exc_info=task.exception())
