"""Torch helpers shared by the pipeline runners: device choice and random initialisation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def random_init(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Iterator[None]:
    """Create modules with random weights directly on ``device`` in ``dtype``, seeded.

    No CPU initialisation and no float32 copy of a large model. Every replica gets the same
    weights for the same seed and device type; the caller's RNG state is left untouched.
    ``torch.set_default_dtype`` is process-wide: build models before serving traffic.
    """
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [torch.cuda.current_device() if device.index is None else device.index]
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(previous)
