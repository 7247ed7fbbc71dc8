"""Retry a batched model call in halves when the GPU runs out of memory.

A batch that fits most of the time can still fail: a larger size, a fragmented allocator, a
neighbour on the same GPU. Splitting keeps the job alive at a lower throughput instead of
failing every image of the call. The helper is torch-only and knows nothing of the model:
``call`` maps a list of items to one result per item.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class OutOfGPUMemory(RuntimeError):
    """Even a single item does not fit in GPU memory; splitting further is impossible."""


def free_accelerator_memory() -> None:
    """Drop unreachable tensors and hand cached CUDA blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OOMSplitter:
    """Runs calls that split themselves on ``torch.OutOfMemoryError``; counts what it did.

    ``splits`` counts halvings and ``exhausted`` the calls that failed at a single item;
    ``last_split`` is the most recent (size, first half, second half).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.splits = 0
        self.exhausted = 0
        self.last_split: tuple[int, int, int] | None = None

    def run(
        self,
        items: Sequence[T],
        call: Callable[[Sequence[T]], Sequence[R]],
        *,
        unit: str = "item",
        restore: Callable[[], None] | None = None,
    ) -> list[R]:
        """``call(items)``; on OOM free memory, ``restore()`` and retry each half, recursively.

        Results keep the order of ``items``. ``unit`` names one item in the final error
        ("1024x1024 image"). ``restore`` puts back state a call abandoned halfway (e.g. a VAE
        left upcast to float32).
        """
        if not items:
            return []
        failure: str | None = None
        try:
            results = list(call(items))
        except torch.OutOfMemoryError as exc:
            # The traceback pins the failed call's tensors: keep only the message, leave the
            # except block so they become unreachable, then free.
            failure = str(exc) or type(exc).__name__
        if failure is None:
            if len(results) != len(items):
                raise ValueError(f"{self.name}: {len(items)} items gave {len(results)} results")
            return results
        free_accelerator_memory()
        if restore is not None:
            restore()
        if len(items) == 1:
            self.exhausted += 1
            raise OutOfGPUMemory(
                f"{self.name}: out of GPU memory even for a single {unit} ({failure})"
            )
        half = (len(items) + 1) // 2
        self.splits += 1
        self.last_split = (len(items), half, len(items) - half)
        logger.warning(
            "%s: out of GPU memory for %d %ss; retrying as %d + %d",
            self.name,
            len(items),
            unit,
            half,
            len(items) - half,
        )
        first = self.run(items[:half], call, unit=unit, restore=restore)
        return first + self.run(items[half:], call, unit=unit, restore=restore)
