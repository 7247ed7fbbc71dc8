"""The supervisor of background loops, without a database: restarts, stalls, health."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ourvidz_serve.errors import DatabaseUnavailable
from ourvidz_serve.workers.supervision import HealthCheck, ReplicaUnhealthy, Supervisor


async def settle(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_a_loop_that_raises_any_error_is_logged_with_its_traceback_and_runs_again(caplog):
    supervisor = Supervisor(restart_max_s=0.05, stall_s=60)
    rounds: list[int] = []

    async def flaky() -> None:
        rounds.append(len(rounds))
        if len(rounds) in (2, 3):
            raise KeyError("a bug in round two")
        if len(rounds) == 4:
            raise DatabaseUnavailable("the database is restarting")

    with caplog.at_level(logging.WARNING, logger="ourvidz_serve.workers.supervision"):
        supervisor.every("flaky", 0.01, flaky)
        await settle(lambda: len(rounds) >= 8)
        report = supervisor.report()["flaky"]
        await supervisor.stop()
    assert report["restarts"] == 3 and report["failures"] == 0 and report["running"]
    assert report["last_success"] is not None
    bugs = [r for r in caplog.records if r.levelno == logging.ERROR]
    outages = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(bugs) == 2 and all(r.exc_info and "a bug" in str(r.exc_info[1]) for r in bugs)
    assert len(outages) == 1 and "restarting" in outages[0].getMessage()


async def test_a_loop_that_returns_is_started_again():
    supervisor = Supervisor(restart_max_s=0.01, stall_s=60)
    starts = 0

    async def short_lived(beat) -> None:
        nonlocal starts
        starts += 1
        beat()

    supervisor.run("short", short_lived)
    await settle(lambda: starts >= 3)
    await supervisor.stop()
    assert supervisor.names() == []


async def test_a_loop_failing_with_a_bug_past_the_stall_limit_is_a_problem_until_it_recovers():
    supervisor = Supervisor(restart_max_s=0.01, stall_s=0.2)
    health = HealthCheck(_answers, timeout_s=1.0, outage_s=60)
    failing = True

    async def round_() -> None:
        if failing:
            raise asyncio.InvalidStateError("stuck")

    supervisor.every("stuck", 0.01, round_)
    await asyncio.sleep(0.1)
    assert supervisor.problems() == [], "failing, but not for long yet"
    await asyncio.sleep(0.25)
    [problem] = supervisor.problems()
    assert "stuck" in problem and "InvalidStateError" in problem
    with pytest.raises(ReplicaUnhealthy, match="stuck"):
        await health.check(supervisor.problems())
    assert health.failed
    failing = False
    await settle(lambda: not supervisor.problems())
    await health.check(supervisor.problems())
    assert not health.failed
    await supervisor.stop()


async def test_a_loop_failing_because_the_database_is_away_is_no_loop_problem():
    """An outage is judged by the health check's own database probe, not per loop."""
    supervisor = Supervisor(restart_max_s=0.01, stall_s=0.1)

    async def round_() -> None:
        raise DatabaseUnavailable("the database is unavailable (OSError); retry shortly")

    supervisor.every("outage", 0.01, round_)
    await asyncio.sleep(0.3)
    assert supervisor.report()["outage"]["failures"] >= 3
    assert supervisor.problems() == []
    await supervisor.stop()


async def test_a_round_that_hangs_is_a_problem():
    supervisor = Supervisor(restart_max_s=0.01, stall_s=0.1)
    supervisor.every("hangs", 0.05, lambda: asyncio.sleep(3600))
    await asyncio.sleep(0.3)
    [problem] = supervisor.problems()
    assert "has not completed a round" in problem
    await supervisor.stop()


async def test_the_health_check_tolerates_a_short_outage_and_fails_a_long_one():
    down = True

    async def ping() -> None:
        if down:
            raise DatabaseUnavailable("the database is unavailable (OSError); retry shortly")

    def unrenewed() -> list[str]:
        return ["the leases of 1 held jobs were last renewed 20s ago (lease 30s)"]

    health = HealthCheck(ping, timeout_s=1.0, outage_s=0.2)
    # Leases go unrenewed in an outage for everybody: not this replica's fault.
    await health.check([], unrenewed)
    await asyncio.sleep(0.3)
    with pytest.raises(ReplicaUnhealthy, match=r"unavailable.*\(for 0s\)"):
        await health.check([], unrenewed)
    down = False
    # The database answers again: now unrenewed leases are this replica's problem.
    with pytest.raises(ReplicaUnhealthy, match="last renewed"):
        await health.check([], unrenewed)
    await health.check([])


async def test_the_health_check_bounds_the_database_probe():
    async def hangs() -> None:
        await asyncio.sleep(10)

    health = HealthCheck(hangs, timeout_s=0.1, outage_s=0)
    await health.check([])  # the first failure starts the outage clock
    await asyncio.sleep(0.01)
    with pytest.raises(ReplicaUnhealthy, match=r"did not answer within 0\.1s"):
        await health.check(["the claim loop is not running"])


async def _answers() -> None:
    return None
