"""Waiting for a condition in async tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def until(
    check: Callable[[], Awaitable[Any]],
    timeout_s: float = 60.0,
    what: str = "condition",
    poll_s: float = 0.1,
) -> Any:
    """The first truthy value ``check()`` returns; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached"
        await asyncio.sleep(poll_s)
