"""Plain data passed to and returned by the model pipelines (no Ray, no HTTP)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

import torch

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total_steps)."""


class EnhanceTarget(StrEnum):
    SDXL = "sdxl"
    WAN_IMAGE = "wan_image"
    WAN_VIDEO = "wan_video"


@dataclass(frozen=True)
class ImageRequest:
    """One SDXL image. A job of N images is N requests with seeds S..S+N-1."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    reference_image: bytes | None = None
    """Encoded reference image (PNG/JPEG/WebP); when set the image-to-image pipeline runs."""
    reference_strength: float = 0.7


@dataclass(frozen=True)
class VideoRequest:
    """One WAN output: an image when ``num_frames == 1``, else an MP4 at ``fps``."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    num_frames: int
    fps: int = 16


@dataclass(frozen=True)
class EnhanceRequest:
    prompt: str
    target: EnhanceTarget


@dataclass(frozen=True)
class EncodedAsset:
    """A finished output, already encoded, as it will be stored."""

    data: bytes
    mime_type: str
    seed: int
    width: int
    height: int
    num_frames: int = 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class EnhanceResult:
    """One enhanced prompt; ``used_fallback`` means the original prompt is returned unchanged."""

    enhanced_prompt: str
    used_fallback: bool
    warning: str | None = None


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
