"""Inference settings for a diffusers pipeline and its denoiser (a UNet or a transformer).

One place decides the compute dtype, the attention backend, the memory layout, the VAE's
slicing and tiling and ``torch.compile``, and says what it applied as plain data so that
readiness answers and logs show how a replica really runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from ourvidz_serve.errors import ModelLoadError
from ourvidz_serve.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_ATTENTION = "sdpa"
"""What attention runs without a backend: torch's scaled_dot_product_attention, which picks
its flash or memory-efficient kernel itself."""


def inference_dtype(device: torch.device, cuda_dtype: torch.dtype) -> torch.dtype:
    """``cuda_dtype`` on CUDA; float32 elsewhere, where half-precision kernels are slow."""
    return cuda_dtype if device.type == "cuda" else torch.float32


def attention_backend_names() -> list[str]:
    """The backend names diffusers' attention dispatcher knows, sorted."""
    return sorted(member.value for member in AttentionBackendName)


def check_attention_backend_name(name: str | None) -> None:
    """Raise ModelLoadError unless ``name`` is unset or a backend diffusers knows (no weights
    need loading to tell)."""
    known = attention_backend_names()
    if name is not None and name.lower() not in known:
        raise ModelLoadError(
            f"unknown attention backend {name!r} (OURVIDZ_ATTENTION_BACKEND); diffusers knows: "
            + ", ".join(known)
        )


@dataclass(frozen=True)
class AccelerationOptions:
    """What to apply; see the fields of the same names in ``Settings``."""

    attention_backend: str | None = None
    channels_last: bool = True
    vae_slicing: bool = True
    vae_tiling: bool = False
    torch_compile: bool = False
    compile_backend: str = "inductor"
    """torch.compile backend: Inductor in service; Dynamo's "eager" checks the plumbing fast."""

    @classmethod
    def from_settings(
        cls, settings: Settings, *, compile_backend: str = "inductor"
    ) -> AccelerationOptions:
        return cls(
            attention_backend=settings.attention_backend,
            channels_last=settings.channels_last,
            vae_slicing=settings.vae_slicing,
            vae_tiling=settings.vae_tiling,
            torch_compile=settings.torch_compile,
            compile_backend=compile_backend,
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def vae_decode_dtype(vae: torch.nn.Module) -> torch.dtype:
    """The dtype the VAE really decodes in: SDXL pipelines upcast a float16 VAE whose config
    sets ``force_upcast`` (the SDXL VAE overflows in float16) to float32 for the decode."""
    dtype = next(vae.parameters()).dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def _dispatching_attention_modules(denoiser: torch.nn.Module) -> int:
    """Attention modules whose processor routes through diffusers' backend dispatcher.

    SDXL's ``AttnProcessor2_0`` (and the IP-Adapter processors) call torch SDPA directly, so
    a backend set on a UNet changes nothing there; WAN's processors dispatch.
    """
    return sum(
        1
        for module in denoiser.modules()
        if hasattr(getattr(module, "processor", None), "_attention_backend")
    )


def apply_attention_backend(denoiser: Any, name: str | None) -> str:
    """Set ``name`` on the denoiser; return the backend its attention really uses.

    An unknown name or a backend whose package is missing raises ModelLoadError. A known
    name that none of the denoiser's processors can use is logged and reported as "sdpa"
    rather than failing, since one setting serves every model family of a deployment.
    """
    if name is None:
        return DEFAULT_ATTENTION
    check_attention_backend_name(name)
    if _dispatching_attention_modules(denoiser) == 0:
        logger.warning(
            "attention backend %r not applied: %s's attention processors call torch SDPA "
            "directly and ignore diffusers' dispatcher",
            name,
            type(denoiser).__name__,
        )
        return DEFAULT_ATTENTION
    try:
        denoiser.set_attention_backend(name)
    except (RuntimeError, ImportError, ValueError) as exc:
        raise ModelLoadError(f"attention backend {name!r} cannot be used here: {exc}") from exc
    return name.lower()


def apply_acceleration(
    pipe: Any, denoiser: Any, options: AccelerationOptions, device: torch.device
) -> dict[str, Any]:
    """Apply ``options`` to ``pipe`` (its ``vae``) and ``denoiser``; describe what was applied.

    Call after the pipeline is on ``device`` and after anything that replaces attention
    processors (an IP-Adapter), and warm the compiled denoiser up before serving traffic.
    """
    attention = apply_attention_backend(denoiser, options.attention_backend)

    # Channels-last helps cuDNN's convolutions; CPU kernels and 3-D convolutions gain nothing.
    has_conv2d = any(isinstance(module, torch.nn.Conv2d) for module in denoiser.modules())
    channels_last = options.channels_last and device.type == "cuda" and has_conv2d
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)

    vae = pipe.vae
    # Slicing decodes a batch one image at a time: the same pixels at 1/N of the peak memory.
    if options.vae_slicing and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    elif hasattr(vae, "disable_slicing"):
        vae.disable_slicing()
    if options.vae_tiling and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    elif hasattr(vae, "disable_tiling"):
        vae.disable_tiling()

    compiled = None
    if options.torch_compile:
        # Regional compilation compiles the repeated block once and reuses it: a fraction of
        # the compile time of the whole model for most of its speed-up. Dynamic shapes from
        # the start: batch sizes (and sizes) vary per call, and a recompile would stall a job.
        kwargs = {"backend": options.compile_backend, "dynamic": True}
        if getattr(denoiser, "_repeated_blocks", None):
            denoiser.compile_repeated_blocks(**kwargs)
            compiled = "repeated_blocks"
        else:
            denoiser.compile(**kwargs)
            compiled = "model"

    description: dict[str, Any] = {
        "device": str(device),
        "dtype": _dtype_name(next(denoiser.parameters()).dtype),
        "vae_dtype": _dtype_name(vae_decode_dtype(vae)),
        "attention_backend": attention,
        "channels_last": channels_last,
        "vae_slicing": bool(getattr(vae, "use_slicing", False)),
        "vae_tiling": bool(getattr(vae, "use_tiling", False)),
        "compiled": compiled is not None,
        "compile_scope": compiled,
        "compile_backend": options.compile_backend if compiled else None,
    }
    if options.attention_backend is not None and attention != options.attention_backend.lower():
        description["attention_backend_requested"] = options.attention_backend
    logger.info("%s acceleration: %s", type(denoiser).__name__, description)
    return description
