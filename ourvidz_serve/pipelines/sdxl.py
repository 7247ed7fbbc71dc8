"""SDXL text-to-image and image-to-image on diffusers' StableDiffusionXL pipelines."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from huggingface_hub import snapshot_download
from PIL import Image, UnidentifiedImageError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ourvidz_serve.errors import InvalidRequest, ModelLoadError
from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    ImageRequest,
    StepCallback,
)
from ourvidz_serve.pipelines.devices import random_init, resolve_device
from ourvidz_serve.pipelines.encode import encode_png
from ourvidz_serve.pipelines.tokenizers import clip_tokenizer
from ourvidz_serve.settings import ModelProfile, Settings

MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_REFERENCE_PIXELS = 64_000_000
TINY_SIZE = (32, 32)
"""Native (width, height) of the tiny profile: a 15-step image takes a fraction of a second."""

# stabilityai/stable-diffusion-xl-base-1.0, written out so no download is needed.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

# The configs of diffusers' own SDXL pipeline tests, with one resnet per block (not two) to
# halve the time of a step.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 6 time ids x 8 + text_encoder_2 projection 32
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "latent_channels": 4,
    "sample_size": 128,
}
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class SDXLConfigs:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]


SDXL_BASE_CONFIGS = SDXLConfigs(
    SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG
)
TINY_CONFIGS = SDXLConfigs(
    TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_ENCODER_CONFIG, TINY_TEXT_ENCODER_CONFIG
)


def build_random_sdxl_pipeline(
    configs: SDXLConfigs, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline with random weights created directly on ``device`` (meta works too)."""
    tokenizer = clip_tokenizer()
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }

    def text_config(config: dict[str, Any]) -> CLIPTextConfig:
        vocab_size = max(config.get("vocab_size", 0), len(tokenizer))
        return CLIPTextConfig(**{**config, "vocab_size": vocab_size, **token_ids})

    with random_init(device, dtype, seed):
        unet = UNet2DConditionModel(**configs.unet)
        vae = AutoencoderKL(**configs.vae)
        text_encoder = CLIPTextModel(text_config(configs.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(configs.text_encoder_2))
    # diffusers' hints name CLIPTokenizer; any tokenizer with the same call interface works.
    components: dict[str, Any] = {
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": clip_tokenizer(),
        "unet": unet.eval(),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    }
    return StableDiffusionXLPipeline(**components, add_watermarker=False)


SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"


def _cached_sdxl_base_configs() -> str:
    """The local Hugging Face cache's SDXL base configs and tokenizers (never downloaded).

    A single-file checkpoint holds weights only; diffusers would otherwise fetch these from
    the Hub even with ``local_files_only=True``.
    """
    try:
        return snapshot_download(
            SDXL_BASE_REPO, local_files_only=True, allow_patterns=["*.json", "*.txt"]
        )
    except Exception as exc:
        raise ModelLoadError(
            "a single-file SDXL checkpoint needs the SDXL base configs and tokenizers (no "
            f"weights) in the local Hugging Face cache: `hf download {SDXL_BASE_REPO} "
            "--include '*.json' '*.txt'`; or point OURVIDZ_SDXL_CHECKPOINT at a diffusers folder"
        ) from exc


def load_sdxl_pipeline(path: Path | None, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """Real weights: a single ``.safetensors`` checkpoint or a diffusers folder, offline only."""
    if path is None:
        raise ModelLoadError(
            "OURVIDZ_SDXL_CHECKPOINT is not set: the weights profile needs a local SDXL "
            "checkpoint (.safetensors file or diffusers folder)"
        )
    if not path.exists():
        raise ModelLoadError(f"SDXL checkpoint {path} does not exist")
    try:
        if path.is_file():
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path),
                config=_cached_sdxl_base_configs(),
                dtype=dtype,
                local_files_only=True,
                add_watermarker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(path), dtype=dtype, local_files_only=True, add_watermarker=False
            )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load SDXL weights from {path}: {exc}") from exc
    return pipe


@dataclass(frozen=True)
class _Prepared:
    index: int
    request: ImageRequest
    width: int
    height: int
    reference: Image.Image | None

    @property
    def group_key(self) -> tuple[object, ...]:
        """Requests with equal keys run as one batched pipeline call."""
        r = self.request
        strength = r.reference_strength if self.reference is not None else None
        return (
            r.steps,
            r.guidance_scale,
            self.width,
            self.height,
            self.reference is not None,
            strength,
            r.negative_prompt is None,
        )

    @property
    def denoising_steps(self) -> int:
        if self.reference is None:
            return self.request.steps
        return min(int(self.request.steps * self.request.reference_strength), self.request.steps)


def _decode_reference(data: bytes, index: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_REFERENCE_PIXELS:
                raise InvalidRequest(
                    f"reference image of request {index} is too large "
                    f"({image.width}x{image.height})"
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(
            f"reference image of request {index} cannot be decoded: {exc}"
        ) from exc


class SDXLPipelineRunner:
    """Batched SDXL generation; one image's pixels depend only on its own request."""

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        *,
        profile: ModelProfile,
        device: torch.device,
    ) -> None:
        self.profile = profile
        self.device = device
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.img2img = StableDiffusionXLImg2ImgPipeline(
            **self.pipe.components,
            force_zeros_for_empty_prompt=self.pipe.config["force_zeros_for_empty_prompt"],
            add_watermarker=False,
        )
        self.img2img.set_progress_bar_config(disable=True)
        # Both pipelines share one scheduler and VAE (whose dtype the pipelines switch).
        self._lock = threading.Lock()

    @classmethod
    def build(cls, settings: Settings) -> SDXLPipelineRunner:
        device = resolve_device(settings.device)
        # On CUDA the VAE stays float16 with force_upcast: diffusers decodes in float32.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        profile = settings.model_profile
        if profile is ModelProfile.TINY:
            pipe = build_random_sdxl_pipeline(TINY_CONFIGS, device, dtype)
        elif profile is ModelProfile.FULL_RANDOM:
            pipe = build_random_sdxl_pipeline(SDXL_BASE_CONFIGS, device, dtype)
        else:
            pipe = load_sdxl_pipeline(settings.sdxl_checkpoint, dtype)
        return cls(pipe, profile=profile, device=device)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the produced image: the tiny profile's native size, else as asked."""
        if self.profile is ModelProfile.TINY:
            return TINY_SIZE
        return width, height

    def _prepare(self, index: int, request: ImageRequest) -> _Prepared:
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidRequest(f"request {index}: the prompt is empty")
        if not 1 <= request.steps <= MAX_STEPS:
            raise InvalidRequest(f"request {index}: steps must be 1..{MAX_STEPS}")
        if not 0.0 <= request.guidance_scale <= MAX_GUIDANCE:
            raise InvalidRequest(f"request {index}: guidance_scale must be 0..{MAX_GUIDANCE}")
        for name, value in (("width", request.width), ("height", request.height)):
            if not MIN_SIZE <= value <= MAX_SIZE or value % 8:
                raise InvalidRequest(
                    f"request {index}: {name} must be a multiple of 8 in {MIN_SIZE}..{MAX_SIZE}"
                )
        width, height = self.output_size(request.width, request.height)
        reference = None
        if request.reference_image is not None:
            if not 0.0 < request.reference_strength <= 1.0:
                raise InvalidRequest(f"request {index}: reference_strength must be in (0, 1]")
            if int(request.steps * request.reference_strength) < 1:
                raise InvalidRequest(
                    f"request {index}: steps x reference_strength leaves no denoising step"
                )
            image = _decode_reference(request.reference_image, index)
            reference = image.resize((width, height), Image.Resampling.LANCZOS)
        return _Prepared(index, request, width, height, reference)

    def validate(self, requests: Sequence[ImageRequest]) -> None:
        """Raise InvalidRequest for any request ``generate`` would reject (no model time)."""
        for index, request in enumerate(requests):
            self._prepare(index, request)

    def generate(
        self, requests: Sequence[ImageRequest], on_step: StepCallback | None = None
    ) -> list[EncodedAsset]:
        """PNG images in request order, one batched pipeline call per group of compatible requests.

        Every request is validated before any model time. ``on_step(done, total)`` counts
        denoising steps over all groups of this call; an exception it raises aborts the call.
        """
        prepared = [self._prepare(i, r) for i, r in enumerate(requests)]
        groups: dict[tuple[object, ...], list[_Prepared]] = {}
        for item in prepared:
            groups.setdefault(item.group_key, []).append(item)
        total = sum(group[0].denoising_steps for group in groups.values())
        pixels: dict[int, np.ndarray] = {}
        done = 0
        with self._lock, torch.inference_mode():
            for group in groups.values():
                images = self._run_group(group, on_step, done, total)
                done += group[0].denoising_steps
                pixels.update(
                    (item.index, image) for item, image in zip(group, images, strict=True)
                )
        return [
            EncodedAsset(
                data=encode_png(pixels[item.index]),
                mime_type="image/png",
                seed=item.request.seed,
                width=item.width,
                height=item.height,
            )
            for item in prepared
        ]

    def _run_group(
        self, group: list[_Prepared], on_step: StepCallback | None, done: int, total: int
    ) -> np.ndarray:
        first = group[0]
        negatives = None
        if first.request.negative_prompt is not None:
            negatives = [item.request.negative_prompt or "" for item in group]
        generators = [
            torch.Generator(device=self.device).manual_seed(item.request.seed) for item in group
        ]

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            if on_step is not None:
                on_step(done + step + 1, total)
            return {}

        common: dict[str, Any] = {
            "prompt": [item.request.prompt for item in group],
            "negative_prompt": negatives,
            "num_inference_steps": first.request.steps,
            "guidance_scale": first.request.guidance_scale,
            "generator": generators,
            "output_type": "np",
            "callback_on_step_end": callback,
        }
        if first.reference is None:
            output = self.pipe(width=first.width, height=first.height, **common)
        else:
            output = self.img2img(
                image=[item.reference for item in group],
                strength=first.request.reference_strength,
                **common,
            )
        return np.asarray(output.images)
