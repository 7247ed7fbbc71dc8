"""Supervised background loops: a loop that raises is logged and runs again, never lost.

Every background loop of a replica (claim, LISTEN, heartbeat, progress, backlog, reaper,
callbacks) runs under one :class:`Supervisor`. Anything but cancellation is logged with its
traceback and the loop restarts after a jittered exponential backoff; the supervisor keeps
each loop's last success, so a health check can tell a loop that keeps failing from one that
recovered. No Ray: the deployments turn :meth:`Supervisor.problems` into ``check_health``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ourvidz_serve.errors import DatabaseUnavailable, StorageError

logger = logging.getLogger(__name__)

Beat = Callable[[], None]
"""Called by a loop each time it did its work: its last success."""

FIRST_RESTART_S = 0.1


def is_transient(error: BaseException) -> bool:
    """Errors that pass on their own: the database or storage was unavailable, or cancelled,
    timed out or rolled back a statement (the repository maps those to
    ``DatabaseUnavailable``). Anything else is a bug, and is logged as one."""
    return isinstance(error, DatabaseUnavailable | StorageError | TimeoutError)


@dataclass
class LoopState:
    name: str
    started_at: float
    last_success: float | None = None
    """``time.monotonic()`` of the loop's last completed round."""
    last_success_wall: datetime | None = None
    failures: int = 0
    """Consecutive failures since the last success."""
    restarts: int = 0
    last_error: str | None = None
    last_error_transient: bool = False
    period_s: float | None = None
    """A periodic loop's interval: a round that never completes is a problem too."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def beat(self) -> None:
        self.last_success = time.monotonic()
        self.last_success_wall = datetime.now(UTC)
        self.failures = 0

    def report(self, now: float) -> dict[str, Any]:
        return {
            "last_success": self.last_success_wall.isoformat() if self.last_success_wall else None,
            "seconds_since_success": (
                None if self.last_success is None else round(now - self.last_success, 3)
            ),
            "failures": self.failures,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "running": self.task is not None and not self.task.done(),
        }


class Supervisor:
    """Runs named loops until :meth:`stop`; restarts each one that ends or raises."""

    def __init__(self, *, restart_max_s: float, stall_s: float) -> None:
        self._restart_max_s = restart_max_s
        self._stall_s = stall_s
        self._loops: dict[str, LoopState] = {}

    def run(
        self, name: str, body: Callable[[Beat], Awaitable[None]], period_s: float | None = None
    ) -> None:
        """Run ``body(beat)`` for ever: restarted whenever it returns or raises."""
        if name in self._loops:
            raise ValueError(f"a loop named {name!r} is already supervised")
        state = LoopState(name, started_at=time.monotonic(), period_s=period_s)
        self._loops[name] = state
        state.task = asyncio.create_task(self._supervise(state, body), name=name)

    def every(
        self, name: str, interval_s: float, round_: Callable[[], Awaitable[float | None]]
    ) -> None:
        """Run ``round_()`` every ``interval_s`` (or after the delay it returns, if any)."""

        async def periodic(beat: Beat) -> None:
            while True:
                delay = await round_()
                beat()
                await asyncio.sleep(interval_s if delay is None else delay)

        self.run(name, periodic, period_s=interval_s)

    async def _supervise(self, state: LoopState, body: Callable[[Beat], Awaitable[None]]) -> None:
        while True:
            try:
                await body(state.beat)
                error: BaseException = RuntimeError(f"the {state.name} loop returned")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged below; the loop outlives bugs too
                error = exc
            state.failures += 1
            state.restarts += 1
            state.last_error = f"{type(error).__name__}: {error}"[:500]
            state.last_error_transient = is_transient(error)
            delay = min(self._restart_max_s, FIRST_RESTART_S * 2 ** (state.failures - 1))
            delay *= random.uniform(0.5, 1.0)
            if state.last_error_transient:
                logger.warning(
                    "the %s loop failed (%s); running it again in %.2fs",
                    state.name,
                    state.last_error,
                    delay,
                    exc_info=error,
                )
            else:
                logger.error(
                    "the %s loop failed with an unexpected error (a bug); running it again "
                    "in %.2fs",
                    state.name,
                    delay,
                    exc_info=error,
                )
            await asyncio.sleep(delay)

    def problems(self) -> list[str]:
        """Loops that are not running, that keep failing with a bug for longer than the stall
        limit, or whose round has not completed for that long (it hangs).

        A loop failing because the database or storage is unavailable is not one: replacing
        the replica would not bring them back (the health check's own database probe judges
        an outage)."""
        now = time.monotonic()
        found = []
        for state in self._loops.values():
            if state.task is None or state.task.done():
                found.append(f"the {state.name} loop is not running")
                continue
            since = state.last_success if state.last_success is not None else state.started_at
            quiet = now - since
            if state.failures and not state.last_error_transient and quiet > self._stall_s:
                found.append(
                    f"the {state.name} loop has failed {state.failures} times in a row for "
                    f"{quiet:.0f}s (last: {state.last_error})"
                )
            elif (
                not state.failures
                and state.period_s is not None
                and quiet > self._stall_s + state.period_s
            ):
                found.append(f"the {state.name} loop has not completed a round for {quiet:.0f}s")
        return found

    def report(self) -> dict[str, dict[str, Any]]:
        """Each loop's last success, failures and last error (for ``/readyz``)."""
        now = time.monotonic()
        return {name: state.report(now) for name, state in self._loops.items()}

    def names(self) -> list[str]:
        return list(self._loops)

    async def stop(self, names: list[str] | None = None) -> None:
        """Cancel the named loops (all by default) and wait for them to end."""
        popped = (self._loops.pop(name, None) for name in (names or list(self._loops)))
        chosen = [state for state in popped if state is not None]  # stopping twice is harmless
        tasks = [state.task for state in chosen if state.task is not None]
        for task in tasks:
            task.cancel()
        # A supervised loop ends only by cancellation; anything else is reported, not dropped.
        for task, result in zip(
            tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(result, Exception):
                logger.error("the %s loop ended with an error", task.get_name(), exc_info=result)


class ReplicaUnhealthy(RuntimeError):
    """Raised by a replica's health check; Serve replaces a replica whose check raises."""


class HealthCheck:
    """A replica's health check, which Serve acts on: its loops' problems, the database
    answering, and (while it answers) the replica's own duties such as renewing leases.

    The pool must answer ``SELECT 1`` within ``timeout_s``; one that has not for longer than
    ``outage_s`` fails the check. A shorter outage does not: every replica sees it at once,
    and replacing them all would only reload every model while the database is away.
    """

    def __init__(
        self, ping: Callable[[], Awaitable[None]], *, timeout_s: float, outage_s: float
    ) -> None:
        self._ping = ping
        self._timeout_s = timeout_s
        self._outage_s = outage_s
        self._failing_since: float | None = None
        self.failed = False
        """Whether the last check failed: a replica Serve stops after it is being replaced,
        not rolled, and keeps the attempts of what it releases counted."""

    async def check(self, problems: list[str], duties: Callable[[], list[str]] = list) -> None:
        """Raise ``ReplicaUnhealthy`` naming every problem found."""
        found = list(problems)
        error = await self._probe()
        now = time.monotonic()
        if error is None:
            self._failing_since = None
            # Judged only while the database answers: in an outage nobody renews leases.
            found += duties()
        else:
            since = self._failing_since = self._failing_since or now
            if now - since > self._outage_s:
                found.append(f"{error} (for {now - since:.0f}s)")
        self.failed = bool(found)
        if found:
            logger.error("health check failed: %s", "; ".join(found))
            raise ReplicaUnhealthy("; ".join(found))

    async def _probe(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._ping()
        except TimeoutError:
            return f"the database did not answer within {self._timeout_s:g}s"
        except DatabaseUnavailable as exc:
            return f"the database is unavailable: {exc.message}"
        return None
