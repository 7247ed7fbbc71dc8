"""GPU memory plan: what each model replica needs, and whether a deployment profile fits.

A replica's need is

    CUDA context + weights + peak activations x (1 + ACTIVATION_MARGIN)

**Weights** are counted, not guessed: the runner's own builders (``build_random_sdxl_pipeline``,
``build_random_wan_pipeline``, ``build_random_qwen``) build the real modules on the ``meta``
device (no memory, about a second each) in the dtype each runner uses on CUDA, and the
parameter and buffer bytes are summed. The ``weights`` profile loads checkpoints of the same
architectures, so it needs the same bytes as ``full-random``; ``tiny`` uses the tiny configs.

================  ===================================================================  ========
deployment        components (dtype on CUDA)                                            bytes
================  ===================================================================  ========
SDXL              UNet 2.567 B params, VAE 83.7 M, CLIP-L 123 M, OpenCLIP-bigG 695 M     6.94 GB
                  (all float16; the VAE is upcast to float32 only while it decodes)
WAN               transformer 1.419 B params (bfloat16, diffusers keeps rope, time        14.71 GB
                  embedder, modulation tables and norms in float32: 2.85 GB), UMT5-XXL
                  encoder 5.68 B (bfloat16: 11.36 GB), VAE 127 M (float32: 0.51 GB)
Enhancer          Qwen2.5-7B 7.616 B params (bfloat16; Qwen's card: 7.61 B, 15.2 GB)      15.23 GB
================  ===================================================================  ========

**Activations** are simple formulas over the shapes of the biggest tensors alive at a
replica's peak; each names its multiplier and how it was found. The multipliers were read off
:class:`MetaPeakTracker`, which runs the real modules on the meta device and records the most
bytes of intermediate tensors alive at once (``tests/pipelines/test_memory_plan.py`` checks
the formulas against it, so a change in diffusers or transformers that moves a peak shows up).
Attention is assumed to run in a fused kernel (PyTorch SDPA's flash / memory-efficient
kernels, or a diffusers backend), so its memory is linear in the sequence length.

* SDXL (:func:`sdxl_activation_bytes`), N images at 1024x1024, float16:
  - UNet step: classifier-free guidance doubles the batch (2N). Per sample and latent pixel
    (1024² -> 128x128 latents) about ``UNET_LIVE_MAPS`` = 14 maps of the first block's 320
    channels are alive: the skip connections held for the up path (~5 x 320) plus the up
    path's working set at full latent resolution (~3 tensors of its 960-channel input).
    Traced: 140 MiB per sample, 1.64 GiB for 6 images (batch 12).
  - VAE decode: diffusers upcasts the float16 VAE to float32 to decode (``force_upcast``), so
    the VAE's float32 copy (0.31 GiB) plus ``VAE_LIVE_MAPS`` = 3 float32 maps of the widest
    full-resolution feature map (256 channels x 1024²: 1 GiB each) per image decoded at once
    (one with ``vae_slicing``, N without). Traced: 3.00 GiB per image.
  - Peak = the larger of the two (the UNet's activations are gone when the VAE decodes): at
    6 images the VAE decode (3.4 GiB) is the peak, so the batch size barely matters with
    slicing. The text encoders (< 0.1 GiB at 77 tokens) and the reference-image encode of
    image-to-image (2.5 GiB traced, below the decode) never set the peak.
  - Cross-check: SDXL float16 at 1024², batch 1, is commonly quoted at ~7-10 GB peak. Here:
    6.94 GB weights + 3.3 GiB decode = ~10.5 GB allocated (11.7 GB with context and margin).
    The upcast float32 decode is what lifts it to the top of that range (the reason the
    "fp16-fix" SDXL VAE exists).
* WAN (:func:`wan_activation_bytes`), 832x480, up to ``WAN_MAX_FRAMES`` = 121 frames (a job
  may ask for 1..121; the catalog's video default is 81):
  - Transformer step: 81 frames -> latents 16 x 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 tokens
    (patch 1x2x2). diffusers runs the conditional and unconditional passes one after the
    other (batch 1), so a step holds one pass: per token the FFN's two 8,960-wide bfloat16
    tensors plus ~6 bfloat16 tensors of width 1,536 (residual stream and norms kept in
    float32, q/k/v, attention output). Traced: 54.3 KB per token, 1.66 GiB at 81 frames.
  - VAE decode (float32): WAN's causal VAE decodes one latent frame (4 output frames) at a
    time with cached frames, so its working set does not grow with the video: about
    ``WAN_VAE_LIVE_MAPS`` = 6.5 maps of 4 frames x 192 channels (the widest map at full
    resolution, x 832x480 x 4 B: 1.14 GiB each); plus the decoded video (3 x F x 480 x 832 x
    4 B: 0.36 GiB at 81 frames). Traced: 7.61 GiB at 81 frames, 7.42 at 41 (formula: 7.79
    and 7.61; 7.97 at 121 frames): the decode is WAN's peak, 3-5x the transformer step.
  - With ``vae_tiling`` diffusers decodes 256x256 tiles with a 192-pixel stride: the working
    set shrinks to one tile's (x 65,536 / 399,360 pixels), plus the decoded tiles (the video x
    (256/192)² for the overlaps) and the blended video. Formula: 2.2 GiB at 81 frames
    (traced: 1.68 GiB; the formula keeps the overlap copies that the trace frees earlier),
    2.7 GiB at 121 frames.
  - A step cache (``wan_step_cache``) holds hidden-state-sized tensors across steps per
    guidance branch: an allowance of 4 x tokens x 1,536 x 4 B (0.75 GiB at 81 frames).
  - Cross-check: Wan-AI's own figure for T2V-1.3B at 480p, 81 frames is 8.19 GB peak, with
    ``--offload_model True --t5_cpu`` (UMT5 on the CPU, the DiT moved off the GPU before the
    VAE decodes). That peak is the VAE decode: 0.51 GB VAE + 7.61 GiB traced (8.17 GB) = 8.7
    GB, or 8.9 GB by the formula. This service keeps all three WAN components resident (no
    offload), so a replica needs the 14.7 GB of weights on top: ~23 GB plus context at 81
    frames, near the ~20 GB quoted by third parties for "everything resident".
* Enhancer (:func:`qwen_activation_bytes`), Qwen2.5-7B bfloat16, a batch of
  ``ENHANCER_BATCH`` = 8 prompts of up to ``ENHANCER_PROMPT_TOKENS`` = 1,024 tokens plus 256
  new tokens:
  - KV cache: 2 (K, V) x 28 layers x 4 KV heads x 128 x 2 B = 56 KiB per token; 8 x 1,280
    tokens = 0.55 GiB at the end of generation.
  - Prefill working set: per prompt token the MLP's three 18,944-wide tensors (gate, up,
    act(gate) x up) and ~4 hidden-sized tensors (3,584 wide), all bfloat16: 139 KB per token,
    1.09 GiB for 8 x 1,024 tokens (traced: exactly that plus the prompt's KV cache).
  - Logits: ``generate`` asks for the last position's only (``logits_to_keep=1``): 8 x 152,064
    in bfloat16 plus float32 copies for the processors, a few MB.
  - Peak = max(prefill: prompt KV + working set, end: full KV + one layer's concatenation
    copy) + logits: 1.53 GiB.
  - Cross-check: Qwen2.5-7B bfloat16 weights are 15.2 GB (Qwen's card: 7.61 B params), as
    counted here; the batch adds 1.5 GiB (10 % of the weights) at the longest prompts.

**Overheads** per replica: ``CUDA_CONTEXT_BYTES`` (0.75 GiB: the CUDA context with lazy module
loading plus cuBLAS/cuDNN handles and workspaces; 0.5-1 GiB is typical per process) and
``ACTIVATION_MARGIN`` (10 % of the activations, for the caching allocator's fragmentation and
convolution workspaces: activations are allocated and freed every step, in many sizes). The
weights get no margin: they are allocated once, at load, in large blocks.

What is not modelled: ``torch_compile`` (Inductor usually lowers the activation peak;
CUDA graphs would add static buffers), an SDXL IP-Adapter's activations (its image encoder
runs at 224², small; its weights are counted from its files when ``sdxl_ip_adapter`` is set),
and SDXL tiling (at 1024² diffusers does not tile: its tile is 1024 pixels). WAN image jobs
(1 frame) peak lower than the 121-frame video planned for (traced: 2.6 GiB).

**Profiles and GPUs.** A profile's replicas are placed the way Ray places fractional GPU
requests on a node: a replica with ``num_gpus >= 1`` takes ``ceil(num_gpus)`` whole GPUs (the
runners use one device, so its share is one GPU's memory); fractional replicas go, in the
order of the config, on the first GPU whose assigned fractions leave room (first fit), else
on a new GPU. A replica's share is ``min(num_gpus, 1) x GPU memory``. Ray does not enforce
memory, so the plan checks both: every replica's need fits its share, and every GPU's sum of
needs fits the GPU (which follows from the first when fractions add up to at most 1, but is
what the hardware sees). The start is planned at ``num_replicas`` or
``autoscaling_config.min_replicas`` (at least 1); the most GPUs the profile can use at
``max_replicas`` is reported beside it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ourvidz_serve.catalog import JOB_TYPES, WAN_MAX_FRAMES, ModelFamily
from ourvidz_serve.errors import ModelLoadError
from ourvidz_serve.settings import ModelProfile, Settings

logger = logging.getLogger(__name__)

GIB = 1 << 30

SDXL, WAN, ENHANCER, INGRESS = "SDXL", "WAN", "Enhancer", "Ingress"
MODEL_DEPLOYMENTS = (SDXL, WAN, ENHANCER)
KNOWN_DEPLOYMENTS = (INGRESS, *MODEL_DEPLOYMENTS)

# --- Overheads ------------------------------------------------------------------------------

CUDA_CONTEXT_BYTES = 3 * GIB // 4
"""Per replica process: CUDA context (lazy loading), cuBLAS and cuDNN handles, workspaces."""
ACTIVATION_MARGIN = 0.10
"""Allocator fragmentation and convolution workspaces, as a share of the peak activations."""

# --- Activation multipliers (see the module docstring; traced with MetaPeakTracker) ---------

UNET_LIVE_MAPS = 14
"""SDXL UNet: live maps of ``block_out_channels[0]`` channels per latent pixel and sample."""
VAE_LIVE_MAPS = 3
"""SDXL VAE decode: live float32 maps of the widest full-resolution feature map per image."""
WAN_TRANSFORMER_FFN_TENSORS = 2
"""WAN block: FFN-wide (``ffn_dim``) bfloat16 tensors alive per token at the peak."""
WAN_TRANSFORMER_DIM_TENSORS = 6
"""WAN block: model-wide (``dim``) bfloat16 tensors alive per token besides the FFN's."""
WAN_VAE_LIVE_MAPS = 6.5
"""WAN VAE decode: live float32 maps of one chunk's widest full-resolution feature map."""
WAN_VAE_TILE, WAN_VAE_TILE_STRIDE = 256, 192
"""diffusers' AutoencoderKLWan tiling defaults (pixels)."""
WAN_STEP_CACHE_TENSORS = 4
"""Step cache allowance: float32 hidden-state-sized tensors kept across steps."""
QWEN_MLP_TENSORS = 3
"""Qwen prefill: intermediate-wide tensors alive per token (gate, up, act(gate) x up)."""
QWEN_HIDDEN_TENSORS = 4
"""Qwen prefill: hidden-wide tensors alive per token besides the MLP's."""

ENHANCER_BATCH = 8
"""Prompts per ``generate`` call: ``@serve.batch(max_batch_size=8)`` in deployments/models.py."""
ENHANCER_PROMPT_TOKENS = 1024
"""Longest enhancer prompt in tokens: the chat template and system prompt (~170 tokens) and a
user prompt of up to 2,000 characters (at 2.3 or more characters per token)."""

IP_ADAPTER_SDXL_BYTES = 3_690_000_000 + 703_000_000
"""When ``sdxl_ip_adapter`` is set and its files are not at hand: h94/IP-Adapter's
``sdxl_models`` ViT-bigG image encoder (float16) and ``ip-adapter_sdxl.safetensors``."""


# --- Weights --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentWeights:
    """One module's parameters and buffers as it sits on the GPU."""

    name: str
    parameters: int
    buffer_elements: int
    nbytes: int
    dtypes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parameters": self.parameters,
            "buffer_elements": self.buffer_elements,
            "bytes": self.nbytes,
            "dtypes": list(self.dtypes),
        }


def count_module(name: str, module: torch.nn.Module) -> ComponentWeights:
    """Parameters and buffers of ``module`` (shared tensors once), at their own dtypes."""
    parameters = list(module.parameters())
    buffers = list(module.buffers())
    nbytes = sum(t.numel() * t.element_size() for t in (*parameters, *buffers))
    by_dtype: dict[str, int] = {}
    for tensor in (*parameters, *buffers):
        key = str(tensor.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
    dtypes = tuple(sorted(by_dtype, key=lambda k: -by_dtype[k]))
    return ComponentWeights(
        name=name,
        parameters=sum(p.numel() for p in parameters),
        buffer_elements=sum(b.numel() for b in buffers),
        nbytes=nbytes,
        dtypes=dtypes,
    )


@functools.cache
def model_weights(deployment: str, tiny: bool = False) -> tuple[ComponentWeights, ...]:
    """Each component of a model deployment, built on the meta device in its CUDA dtype.

    ``tiny``: the tiny profile's configs; else the full-size ones (full-random and weights).
    Cached per process. ``random_init`` sets the default dtype process-wide while it builds:
    call this before serving traffic (at start-up), like the runners' own builds.
    """
    meta = torch.device("meta")
    if deployment == SDXL:
        from ourvidz_serve.pipelines import sdxl

        configs = sdxl.TINY_CONFIGS if tiny else sdxl.SDXL_BASE_CONFIGS
        pipe = sdxl.build_random_sdxl_pipeline(configs, meta, torch.float16)
        sdxl_parts = ("unet", "vae", "text_encoder", "text_encoder_2")
        return tuple(count_module(n, getattr(pipe, n)) for n in sdxl_parts)
    if deployment == WAN:
        from ourvidz_serve.pipelines import wan

        wan_configs = wan.TINY_CONFIGS if tiny else wan.WAN_1_3B_CONFIGS
        wan_pipe = wan.build_random_wan_pipeline(wan_configs, meta, torch.bfloat16, torch.float32)
        wan_parts = ("transformer", "text_encoder", "vae")
        return tuple(count_module(n, getattr(wan_pipe, n)) for n in wan_parts)
    if deployment == ENHANCER:
        from ourvidz_serve.pipelines import qwen

        config = qwen.TINY_QWEN_CONFIG if tiny else qwen.QWEN25_7B_CONFIG
        model, _tokenizer = qwen.build_random_qwen(config, meta, torch.bfloat16)
        return (count_module("qwen2", model),)
    raise ValueError(f"{deployment!r} is not a model deployment ({', '.join(MODEL_DEPLOYMENTS)})")


LORA_DTYPE_BYTES = 2
"""Adapters are held in the pipeline's float16 on the GPU, whatever dtype their file has."""


@functools.cache
def lora_parameters_per_rank(tiny: bool = False) -> int:
    """Parameters one rank of an SDXL LoRA adds at most: a down and an up matrix for every
    Linear and Conv2d of the UNet and both text encoders (``fan_in + fan_out`` each), the
    most any file the upload accepts can target. Counted on the meta device, like the weights.
    """
    from ourvidz_serve.pipelines import sdxl

    configs = sdxl.TINY_CONFIGS if tiny else sdxl.SDXL_BASE_CONFIGS
    pipe = sdxl.build_random_sdxl_pipeline(configs, torch.device("meta"), torch.float16)
    total = 0
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for module in getattr(pipe, part).modules():
            if isinstance(module, torch.nn.Linear):
                total += module.in_features + module.out_features
            elif isinstance(module, torch.nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                total += module.in_channels // module.groups * kernel + module.out_channels
    return total


def lora_bytes(settings: Settings) -> dict[str, int]:
    """An SDXL replica's adapters: on the GPU, one call's LoRAs (``sdxl_max_loras_per_job``,
    or the hotswap slots) at the largest rank an upload may have; in host memory, the CPU
    cache (``sdxl_lora_cache`` adapters of that size, at most ``sdxl_lora_max_bytes`` each).
    Typical LoRAs (rank 16 to 64, attention layers only) are far smaller."""
    tiny = settings.model_profile is ModelProfile.TINY
    one = lora_parameters_per_rank(tiny) * settings.sdxl_lora_max_rank * LORA_DTYPE_BYTES
    # A file's float32 copy would be twice the GPU's float16 one, but never above the cap.
    cached = min(2 * one, settings.sdxl_lora_max_bytes)
    return {
        "gpu": settings.sdxl_max_loras_per_job * one,
        "host": settings.sdxl_lora_cache * cached,
    }


def ip_adapter_bytes(folder: Path, weight_name: str) -> int:
    """Bytes of an SDXL IP-Adapter (image encoder and adapter, stored in float16).

    Read from the files' sizes when the folder is at hand; otherwise h94's published sizes.
    """
    files = [*folder.glob("sdxl_models/image_encoder/*.safetensors")]
    files += [*folder.glob(f"sdxl_models/{weight_name}"), *folder.glob(weight_name)]
    found = sum(path.stat().st_size for path in files if path.is_file())
    return found or IP_ADAPTER_SDXL_BYTES


# --- Activations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """Peak activation bytes per phase of a call; phases never overlap, so the peak is a max."""

    phases: dict[str, int]
    assumptions: str

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda phase: self.phases[phase])

    @property
    def peak_bytes(self) -> int:
        return self.phases[self.peak_phase]


def sdxl_activation_bytes(
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    batch_images: int,
    width: int,
    height: int,
    *,
    vae_slicing: bool = True,
    vae_parameters: int = 0,
) -> Activations:
    """SDXL's activation peak for one call of ``batch_images`` images (float16 UNet).

    ``vae_parameters``: the VAE's parameter count, for the float32 copy made to decode.
    """
    vae_channels = vae_config["block_out_channels"]
    scale = 2 ** (len(vae_channels) - 1)
    latent_pixels = (height // scale) * (width // scale)
    c0 = unet_config["block_out_channels"][0]
    unet_batch = 2 * batch_images  # classifier-free guidance
    unet = unet_batch * latent_pixels * UNET_LIVE_MAPS * c0 * 2
    widest = vae_channels[1] if len(vae_channels) > 1 else vae_channels[0]
    at_once = 1 if vae_slicing else batch_images
    decoded = batch_images * 3 * width * height * 4
    decode = vae_parameters * 4 + at_once * VAE_LIVE_MAPS * widest * width * height * 4 + decoded
    slicing = "one image at a time" if vae_slicing else f"{batch_images} images at once"
    return Activations(
        {"UNet step": unet, "VAE decode": decode},
        f"{batch_images} images at {width}x{height}, CFG (UNet batch {unet_batch}), "
        f"float32 VAE decode {slicing}",
    )


def wan_activation_bytes(
    transformer_config: dict[str, Any],
    vae_config: dict[str, Any],
    width: int,
    height: int,
    num_frames: int,
    *,
    vae_tiling: bool = False,
    step_cache: bool = False,
) -> Activations:
    """WAN's activation peak for one output (bfloat16 transformer, float32 VAE)."""
    downsample = vae_config["temperal_downsample"]
    spatial = 2 ** len(downsample)
    temporal = 2 ** sum(bool(d) for d in downsample)
    latent_frames = (num_frames - 1) // temporal + 1
    patch_t, patch_h, patch_w = transformer_config["patch_size"]
    tokens = (
        (latent_frames // patch_t) * (height // spatial // patch_h) * (width // spatial // patch_w)
    )
    dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    per_token = (
        WAN_TRANSFORMER_FFN_TENSORS * transformer_config["ffn_dim"]
        + WAN_TRANSFORMER_DIM_TENSORS * dim
    ) * 2
    cache = WAN_STEP_CACHE_TENSORS * tokens * dim * 4 if step_cache else 0
    transformer = tokens * per_token + cache

    base = vae_config["base_dim"]
    mult = vae_config["dim_mult"]
    widest = base * (mult[1] if len(mult) > 1 else mult[0])
    video = 3 * num_frames * width * height * 4
    chunk_map = temporal * widest * width * height * 4
    tiled = vae_tiling and (width > WAN_VAE_TILE or height > WAN_VAE_TILE)
    if tiled:
        tile_share = min(1.0, WAN_VAE_TILE**2 / (width * height))
        overlap = (WAN_VAE_TILE / WAN_VAE_TILE_STRIDE) ** 2
        decode = int(WAN_VAE_LIVE_MAPS * chunk_map * tile_share + (overlap + 1) * video)
    else:
        decode = int(WAN_VAE_LIVE_MAPS * chunk_map) + video
    how = "tiled" if tiled else "untiled"
    cached = ", step cache on" if step_cache else ""
    return Activations(
        {"transformer step": transformer, "VAE decode": decode + cache},
        f"{num_frames} frames at {width}x{height} ({tokens} tokens), CFG passes in turn, "
        f"{how} float32 VAE decode{cached}",
    )


def qwen_activation_bytes(
    config: dict[str, Any], batch: int, prompt_tokens: int, new_tokens: int
) -> Activations:
    """Qwen2's activation peak for one batched greedy ``generate`` (bfloat16)."""
    layers = config["num_hidden_layers"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv_per_token = 2 * layers * config["num_key_value_heads"] * head_dim * 2
    working_per_token = (
        QWEN_MLP_TENSORS * config["intermediate_size"] + QWEN_HIDDEN_TENSORS * hidden
    ) * 2
    vocab = config.get("vocab_size", 151_936)
    logits = batch * vocab * (2 + 4 + 4)  # bfloat16 logits, float32 copy, processed scores
    prefill = batch * prompt_tokens * (kv_per_token + working_per_token) + logits
    full_kv = batch * (prompt_tokens + new_tokens) * kv_per_token
    end = full_kv + full_kv // layers + logits
    return Activations(
        {"prefill": prefill, "KV cache at the last token": end},
        f"batch {batch} x ({prompt_tokens} prompt + {new_tokens} new tokens)",
    )


# --- A replica's need -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaNeed:
    deployment: str
    components: tuple[ComponentWeights, ...]
    activations: Activations
    context_bytes: int = CUDA_CONTEXT_BYTES
    extra_weights: dict[str, int] = field(default_factory=dict)
    host_bytes: dict[str, int] = field(default_factory=dict)
    """What the replica keeps in host (CPU) memory beside its GPU weights, by name."""

    @property
    def weight_bytes(self) -> int:
        return sum(c.nbytes for c in self.components) + sum(self.extra_weights.values())

    @property
    def activation_bytes(self) -> int:
        return self.activations.peak_bytes

    @property
    def margin_bytes(self) -> int:
        return math.ceil(self.activation_bytes * ACTIVATION_MARGIN)

    @property
    def overhead_bytes(self) -> int:
        return self.context_bytes + self.margin_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "weights": [c.to_dict() for c in self.components],
            "extra_weights": dict(self.extra_weights),
            "weight_bytes": self.weight_bytes,
            "host_bytes": dict(self.host_bytes),
            "activation_phases": dict(self.activations.phases),
            "activation_peak_phase": self.activations.peak_phase,
            "activation_bytes": self.activation_bytes,
            "activation_assumptions": self.activations.assumptions,
            "context_bytes": self.context_bytes,
            "margin_bytes": self.margin_bytes,
            "total_bytes": self.total_bytes,
        }


def _largest_size(family: ModelFamily) -> tuple[int, int]:
    """(width, height) of the family's largest job type in the catalog."""
    sizes = [(s.width, s.height) for s in JOB_TYPES.values() if s.model is family]
    return max(sizes, key=lambda size: size[0] * size[1])


def replica_need(deployment: str, settings: Settings) -> ReplicaNeed:
    """What one replica of ``deployment`` needs on its GPU under ``settings``."""
    tiny = settings.model_profile is ModelProfile.TINY
    components = model_weights(deployment, tiny)
    by_name = {c.name: c for c in components}
    extra: dict[str, int] = {}
    host: dict[str, int] = {}
    if deployment == SDXL:
        from ourvidz_serve.pipelines import sdxl

        configs = sdxl.TINY_CONFIGS if tiny else sdxl.SDXL_BASE_CONFIGS
        width, height = sdxl.TINY_SIZE if tiny else _largest_size(ModelFamily.SDXL)
        activations = sdxl_activation_bytes(
            configs.unet,
            configs.vae,
            settings.sdxl_batch_images,
            width,
            height,
            vae_slicing=settings.vae_slicing,
            vae_parameters=by_name["vae"].parameters,
        )
        if settings.sdxl_ip_adapter is not None and not tiny:
            extra["ip_adapter"] = ip_adapter_bytes(
                settings.sdxl_ip_adapter, settings.sdxl_ip_adapter_weight_name
            )
        adapters = lora_bytes(settings)
        extra["loras"] = adapters["gpu"]
        host["lora_cache"] = adapters["host"]
    elif deployment == WAN:
        from ourvidz_serve.pipelines import wan

        wan_configs = wan.TINY_CONFIGS if tiny else wan.WAN_1_3B_CONFIGS
        width, height = wan.TINY_SIZE if tiny else _largest_size(ModelFamily.WAN)
        activations = wan_activation_bytes(
            wan_configs.transformer,
            wan_configs.vae,
            width,
            height,
            WAN_MAX_FRAMES,
            vae_tiling=settings.vae_tiling,
            step_cache=bool(settings.wan_step_cache),
        )
    elif deployment == ENHANCER:
        from ourvidz_serve.pipelines import qwen

        config = qwen.TINY_QWEN_CONFIG if tiny else qwen.QWEN25_7B_CONFIG
        new_tokens = qwen.TINY_MAX_NEW_TOKENS if tiny else qwen.DEFAULT_MAX_NEW_TOKENS
        activations = qwen_activation_bytes(
            config, ENHANCER_BATCH, ENHANCER_PROMPT_TOKENS, new_tokens
        )
    else:
        raise ValueError(
            f"{deployment!r} is not a model deployment ({', '.join(MODEL_DEPLOYMENTS)})"
        )
    return ReplicaNeed(deployment, components, activations, extra_weights=extra, host_bytes=host)


# --- Deployment profiles (Ray Serve config files) --------------------------------------------


class ProfileError(ValueError):
    """A deployment profile cannot be read or planned; the message says why, for people."""


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    replicas: int
    """Replicas at start: ``num_replicas`` or ``autoscaling_config.min_replicas`` (at least 1)."""
    max_replicas: int
    num_gpus: float
    listed: bool = True
    """False: not in the config, so Serve's defaults (one replica, no GPU)."""


@dataclass(frozen=True)
class ProfileSpec:
    source: str
    args: dict[str, Any]
    deployments: tuple[DeploymentSpec, ...]

    def settings(self) -> Settings:
        """The settings the app builder would make from these args (and the environment)."""
        unknown = sorted(set(self.args) - set(Settings.model_fields))
        if unknown:
            raise ProfileError(
                f"{self.source}: unknown settings in applications[0].args: {', '.join(unknown)}"
            )
        try:
            return Settings(**self.args)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
                for error in exc.errors()
            )
            raise ProfileError(f"{self.source}: invalid settings: {problems}") from exc


def read_profile(path: Path) -> ProfileSpec:
    """Read a Ray Serve config file (``deployments/<profile>.yaml``)."""
    import yaml

    if not path.exists():
        raise ProfileError(f"{path}: no such file")
    if not path.is_file():
        raise ProfileError(f"{path}: not a file")
    try:
        with path.open(encoding="utf-8") as stream:  # YAML errors then name the file
            document = yaml.safe_load(stream)
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    return parse_profile(document, str(path))


def _number(value: Any, where: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{where} must be a number, not {value!r}")
    if value < 0 or (integer and value != int(value)):
        raise ProfileError(f"{where} must be a non-negative {'integer' if integer else 'number'}")
    return float(value)


def parse_profile(document: Any, source: str = "profile") -> ProfileSpec:
    """The planning view of a parsed Ray Serve config: the app's args and its deployments."""
    if not isinstance(document, dict):
        raise ProfileError(f"{source}: expected a Ray Serve config (a mapping at the top)")
    applications = document.get("applications")
    if not isinstance(applications, list) or not applications:
        raise ProfileError(f"{source}: no applications list")
    app = applications[0]
    if not isinstance(app, dict):
        raise ProfileError(f"{source}: applications[0] is not a mapping")
    args = app.get("args") or {}
    if not isinstance(args, dict):
        raise ProfileError(f"{source}: applications[0].args is not a mapping")
    entries = app.get("deployments") or []
    if not isinstance(entries, list):
        raise ProfileError(f"{source}: applications[0].deployments is not a list")
    specs: dict[str, DeploymentSpec] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: deployments[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProfileError(f"{where} has no name")
        name = entry["name"]
        if name not in KNOWN_DEPLOYMENTS:
            raise ProfileError(
                f"{where}: unknown deployment {name!r} (known: {', '.join(KNOWN_DEPLOYMENTS)})"
            )
        if name in specs:
            raise ProfileError(f"{where}: deployment {name!r} is listed twice")
        specs[name] = _deployment_spec(entry, f"{source}: {name}")
    for name in KNOWN_DEPLOYMENTS:
        if name not in specs:
            specs[name] = DeploymentSpec(name, 1, 1, 0.0, listed=False)
    ordered = [specs[e["name"]] for e in entries] + [s for s in specs.values() if not s.listed]
    return ProfileSpec(source, dict(args), tuple(ordered))


def _deployment_spec(entry: dict[str, Any], where: str) -> DeploymentSpec:
    options = entry.get("ray_actor_options") or {}
    if not isinstance(options, dict):
        raise ProfileError(f"{where}: ray_actor_options is not a mapping")
    num_gpus = _number(options.get("num_gpus", 0), f"{where}: num_gpus")
    autoscaling = entry.get("autoscaling_config")
    num_replicas = entry.get("num_replicas")
    if autoscaling is not None:
        if not isinstance(autoscaling, dict):
            raise ProfileError(f"{where}: autoscaling_config is not a mapping")
        # Ray Serve's defaults: min_replicas 1, max_replicas 1.
        low = _number(autoscaling.get("min_replicas", 1), f"{where}: min_replicas", integer=True)
        high = _number(autoscaling.get("max_replicas", 1), f"{where}: max_replicas", integer=True)
        if high < low:
            raise ProfileError(f"{where}: max_replicas is below min_replicas")
        return DeploymentSpec(entry["name"], max(1, int(low)), max(1, int(high)), num_gpus)
    if num_replicas == "auto":  # Serve's default autoscaling: 1 to 100 replicas
        return DeploymentSpec(entry["name"], 1, 100, num_gpus)
    count = int(
        _number(1 if num_replicas is None else num_replicas, f"{where}: num_replicas", integer=True)
    )
    return DeploymentSpec(entry["name"], max(1, count), max(1, count), num_gpus)


# --- The plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentPlan:
    spec: DeploymentSpec
    need: ReplicaNeed | None
    """None: the deployment holds no GPU memory (the ingress, or a replica without a GPU)."""
    share_bytes: int | None

    @property
    def on_gpu(self) -> bool:
        return self.need is not None and self.share_bytes is not None

    @property
    def fits(self) -> bool:
        if self.need is None or self.share_bytes is None:
            return True
        return self.need.total_bytes <= self.share_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "listed": self.spec.listed,
            "replicas": self.spec.replicas,
            "max_replicas": self.spec.max_replicas,
            "num_gpus": self.spec.num_gpus,
            "on_gpu": self.on_gpu,
            "need": self.need.to_dict() if self.need is not None else None,
            "share_bytes": self.share_bytes,
            "fits": self.fits,
        }


@dataclass
class GpuPlan:
    index: int
    total_bytes: int
    replicas: list[str] = field(default_factory=list)
    fraction: float = 0.0
    used_bytes: int = 0
    whole: bool = False
    """Held by one replica with ``num_gpus >= 1`` (no fractional replica joins it)."""

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "replicas": list(self.replicas),
            "num_gpus": round(self.fraction, 6),
            "used_bytes": self.used_bytes,
            "total_bytes": self.total_bytes,
            "free_bytes": self.total_bytes - self.used_bytes,
            "fits": self.fits,
        }


def pack_replicas(replicas: list[tuple[str, float, int]], gpu_bytes: int) -> list[GpuPlan]:
    """Place ``(label, num_gpus, need_bytes)`` replicas on GPUs (see the module docstring)."""
    gpus: list[GpuPlan] = []
    for label, num_gpus, need in replicas:
        if num_gpus >= 1:
            count = math.ceil(num_gpus - 1e-9)
            for k in range(count):
                gpu = GpuPlan(len(gpus), gpu_bytes, whole=True)
                gpu.replicas.append(label if k == 0 else f"{label} (idle)")
                gpu.fraction = min(1.0, num_gpus - k)
                gpu.used_bytes = need if k == 0 else 0
                gpus.append(gpu)
            continue
        target = next((g for g in gpus if not g.whole and g.fraction + num_gpus <= 1 + 1e-9), None)
        if target is None:
            target = GpuPlan(len(gpus), gpu_bytes)
            gpus.append(target)
        target.replicas.append(label)
        target.fraction += num_gpus
        target.used_bytes += need
    return gpus


@dataclass(frozen=True)
class MemoryPlan:
    source: str
    model_profile: str
    gpu_memory_bytes: int | None
    deployments: tuple[DeploymentPlan, ...]
    gpus: tuple[GpuPlan, ...]
    gpus_at_max: tuple[GpuPlan, ...]

    @property
    def problems(self) -> list[str]:
        found = []
        for plan in self.deployments:
            if not plan.fits and plan.need is not None and plan.share_bytes is not None:
                found.append(
                    f"{plan.spec.name}: a replica needs {gib(plan.need.total_bytes)} GiB, its "
                    f"share is {plan.spec.num_gpus:g} x GPU = {gib(plan.share_bytes)} GiB"
                )
        for label, gpus in (("", self.gpus), (" at max replicas", self.gpus_at_max)):
            for gpu in gpus:
                if not gpu.fits:
                    found.append(
                        f"GPU {gpu.index}{label}: {gib(gpu.used_bytes)} GiB planned "
                        f"({', '.join(gpu.replicas)}) > {gib(gpu.total_bytes)} GiB"
                    )
        return found

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_profile": self.model_profile,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "gpu_memory_gib": (
                None if self.gpu_memory_bytes is None else self.gpu_memory_bytes / GIB
            ),
            "fits": self.fits,
            "problems": self.problems,
            "assumptions": {
                "cuda_context_bytes": CUDA_CONTEXT_BYTES,
                "activation_margin": ACTIVATION_MARGIN,
                "placement": "whole GPUs for num_gpus >= 1; fractional replicas first-fit in "
                "config order onto GPUs whose assigned fractions leave room",
            },
            "deployments": [d.to_dict() for d in self.deployments],
            "gpus": [g.to_dict() for g in self.gpus],
            "gpus_at_max_replicas": [g.to_dict() for g in self.gpus_at_max],
        }


def gib(nbytes: int | float) -> str:
    """GiB with one decimal."""
    return f"{nbytes / GIB:.1f}"


def plan_profile(profile: ProfileSpec, gpu_memory_gib: float | None = None) -> MemoryPlan:
    """Each model deployment's need against its share, and each GPU's sum against its memory.

    ``gpu_memory_gib`` overrides the profile's ``gpu_memory_gib`` arg (and the environment's
    ``OURVIDZ_GPU_MEMORY_GIB``).
    """
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise ProfileError("the GPU memory must be more than 0 GiB")
    settings = profile.settings()
    memory = gpu_memory_gib if gpu_memory_gib is not None else settings.gpu_memory_gib
    on_gpu = [d for d in profile.deployments if d.name in MODEL_DEPLOYMENTS and d.num_gpus > 0]
    if on_gpu and memory is None:
        raise ProfileError(
            f"{profile.source}: how much memory has a GPU? Set gpu_memory_gib in "
            "applications[0].args or pass --gpu-memory-gib"
        )
    gpu_bytes = None if memory is None else int(memory * GIB)
    plans = []
    for spec in profile.deployments:
        if spec.name in MODEL_DEPLOYMENTS and spec.num_gpus > 0 and gpu_bytes is not None:
            need = replica_need(spec.name, settings)
            share = int(min(spec.num_gpus, 1.0) * gpu_bytes)
            plans.append(DeploymentPlan(spec, need, share))
        else:
            plans.append(DeploymentPlan(spec, None, None))

    def placed(at_max: bool) -> list[GpuPlan]:
        """The starting replicas in config order, then (at max) the ones scaling adds."""
        if gpu_bytes is None:
            return []
        start: list[tuple[str, float, int]] = []
        added: list[tuple[str, float, int]] = []
        for plan in plans:
            if plan.need is None:
                continue
            last = plan.spec.max_replicas if at_max else plan.spec.replicas
            for k in range(last):
                item = (f"{plan.spec.name}#{k + 1}", plan.spec.num_gpus, plan.need.total_bytes)
                (start if k < plan.spec.replicas else added).append(item)
        return pack_replicas(start + added, gpu_bytes)

    return MemoryPlan(
        source=profile.source,
        model_profile=settings.model_profile.value,
        gpu_memory_bytes=gpu_bytes,
        deployments=tuple(plans),
        gpus=tuple(placed(at_max=False)),
        gpus_at_max=tuple(placed(at_max=True)),
    )


# --- Start-up check and readiness report ------------------------------------------------------


class GpuShareTooSmall(ModelLoadError):
    """A replica's GPU share cannot hold its model's weights (and CUDA context)."""

    code = "gpu_share_too_small"


def check_replica_share(
    deployment: str, settings: Settings, num_gpus: float, *, device: torch.device | None = None
) -> dict[str, Any]:
    """Compare a replica's planned need with its share of the GPU, before it builds its model.

    On CUDA (``settings.device``, or ``device``) the share is ``min(num_gpus, 1) x`` the
    device's total memory from ``torch.cuda.mem_get_info``:

    * share < planned weights + CUDA context: raises :class:`GpuShareTooSmall`. The model
      cannot be loaded without taking memory that Ray gave to other replicas on the GPU, so
      the replica fails at start-up with a message naming both figures, not later with an
      out-of-memory error inside another replica.
    * share < the whole planned need (weights + peak activations + overheads): logs a loud
      warning and answers ``fits: False``. The model loads; its peak (or a neighbour's) may
      not fit, but peaks of replicas sharing a GPU rarely coincide, so this is the operator's
      call (see ``ourvidz-serve plan``).
    * free memory below the planned weights (other processes hold the GPU): a warning too.

    Elsewhere (CPU, or ``num_gpus`` 0) nothing is checked: ``checked: False``. Call it before
    building the runner, in the thread that builds it (the meta builds set the default dtype
    while they run).
    """
    device = device if device is not None else _resolve(settings.device)
    result: dict[str, Any] = {
        "deployment": deployment,
        "device": str(device),
        "num_gpus": num_gpus,
        "checked": False,
        "fits": None,
        "planned_weight_bytes": None,
        "planned_total_bytes": None,
        "share_bytes": None,
        "free_bytes": None,
        "total_bytes": None,
    }
    if device.type != "cuda" or num_gpus <= 0:
        return result
    need = replica_need(deployment, settings)
    free, total = torch.cuda.mem_get_info(device)
    share = int(min(num_gpus, 1.0) * total)
    result.update(
        checked=True,
        fits=need.total_bytes <= share,
        planned_weight_bytes=need.weight_bytes,
        planned_total_bytes=need.total_bytes,
        share_bytes=share,
        free_bytes=int(free),
        total_bytes=int(total),
    )
    if share < need.weight_bytes + need.context_bytes:
        raise GpuShareTooSmall(
            f"{deployment}: num_gpus={num_gpus:g} gives {gib(share)} GiB of this "
            f"{gib(total)} GiB GPU, but the {settings.model_profile.value} model's weights "
            f"and CUDA context need {gib(need.weight_bytes + need.context_bytes)} GiB "
            f"({gib(need.total_bytes)} GiB at its peak); raise num_gpus or use a larger GPU",
            details=result,
        )
    if not result["fits"]:
        logger.warning(
            "%s: num_gpus=%g gives %s GiB, but a replica peaks at %s GiB (weights %s, "
            "activations %s at %s): it may run out of memory at its peak",
            deployment,
            num_gpus,
            gib(share),
            gib(need.total_bytes),
            gib(need.weight_bytes),
            gib(need.activation_bytes),
            need.activations.peak_phase,
        )
    if free < need.weight_bytes:
        logger.warning(
            "%s: only %s GiB of the GPU is free, the weights need %s GiB",
            deployment,
            gib(free),
            gib(need.weight_bytes),
        )
    return result


def _resolve(device: str) -> torch.device:
    from ourvidz_serve.pipelines.devices import resolve_device

    return resolve_device(device)


def gpu_memory_report(device: torch.device | str | None = None) -> dict[str, Any]:
    """This replica's GPU memory, for readiness answers and the metrics.

    On CUDA: ``used_bytes`` is what this process's caching allocator holds
    (``torch.cuda.memory_reserved``: what the replica takes from a shared GPU, without its
    CUDA context), ``total_bytes`` the device's memory, ``device_used_bytes`` what every
    process on the device uses (``total - free`` from ``mem_get_info``), ``allocated_bytes``
    what live tensors use. Elsewhere: ``device: "cpu"`` and None for the GPU figures, with the
    process's resident memory as ``process_rss_bytes`` (None where it cannot be read).
    """
    chosen = torch.device(device) if device is not None else None
    if (chosen is None or chosen.type == "cuda") and torch.cuda.is_available():
        index = chosen.index if chosen is not None and chosen.index is not None else None
        if index is None:
            index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return {
            "device": f"cuda:{index}",
            "name": torch.cuda.get_device_name(index),
            "used_bytes": int(torch.cuda.memory_reserved(index)),
            "total_bytes": int(total),
            "device_used_bytes": int(total - free),
            "allocated_bytes": int(torch.cuda.memory_allocated(index)),
        }
    return {
        "device": "cpu",
        "name": None,
        "used_bytes": None,
        "total_bytes": None,
        "device_used_bytes": None,
        "allocated_bytes": None,
        "process_rss_bytes": _process_rss(),
    }


def _process_rss() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --- Re-deriving the multipliers ------------------------------------------------------------


class MetaPeakTracker(TorchDispatchMode):
    """The most bytes of tensors created inside the block and alive at once.

    Run a module on the ``meta`` device inside it to measure a forward pass's activation peak
    without memory or compute: every op's fresh outputs are counted until they are freed
    (views and in-place results are not new memory). Inputs and weights made outside the
    block are not counted. Fused kernels (SDPA) count their outputs only, as on CUDA with
    flash or memory-efficient attention; allocator rounding and workspaces are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0

    def _freed(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        flat, _spec = tree_flatten(out)
        for tensor in flat:
            if isinstance(tensor, torch.Tensor) and tensor._base is None:
                nbytes = tensor.untyped_storage().nbytes()
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                weakref.finalize(tensor, self._freed, nbytes)
        return out


@contextlib.contextmanager
def traced_peak() -> Iterator[MetaPeakTracker]:
    """``with traced_peak() as t: model(meta_inputs)``, then ``t.peak_bytes``."""
    with torch.inference_mode(), MetaPeakTracker() as tracker:
        yield tracker
