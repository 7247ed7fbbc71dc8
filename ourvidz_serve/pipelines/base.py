"""Plain data passed to and returned by the model pipelines (no torch, no Ray, no HTTP).

The queue workers build and read these; only the model replicas import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ourvidz_serve.catalog import ReferenceType, StepCache

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total_steps)."""


class EnhanceTarget(StrEnum):
    SDXL = "sdxl"
    WAN_IMAGE = "wan_image"
    WAN_VIDEO = "wan_video"


@dataclass(frozen=True)
class LoraWeight:
    """One LoRA applied to an image: its content digest (sha256 hex of the .safetensors file,
    the adapter's identity) and its scale."""

    digest: str
    scale: float


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
    reference_type: ReferenceType = ReferenceType.STYLE
    loras: tuple[LoraWeight, ...] = ()
    """LoRAs applied in this order, each at its scale; every digest must be in the runner's
    CPU cache (``add_lora``). Only requests with the same LoRAs and scales share a call."""


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
    step_cache: StepCache | None = None
    """diffusers step cache on the transformer for this call (None: every step computed)."""


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
    poster: bytes | None = None
    """A video's poster frame (WebP), stored beside it; None for images."""


@dataclass(frozen=True)
class EnhanceResult:
    """One enhanced prompt; ``used_fallback`` means the original prompt is returned unchanged."""

    enhanced_prompt: str
    used_fallback: bool
    warning: str | None = None
    model: str | None = None
    """The enhancer model that answered (None: no model answered)."""


class Enhancer(Protocol):
    """Whatever answers enhancement requests: the Enhancer deployment's handle, a runner."""

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]: ...
