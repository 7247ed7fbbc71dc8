"""SDXL text-to-image and image-to-image on diffusers' StableDiffusionXL pipelines."""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.embeddings import ImageProjection
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from huggingface_hub import snapshot_download
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ourvidz_serve.catalog import ReferenceType
from ourvidz_serve.errors import InvalidRequest, LoraRejected, ModelLoadError
from ourvidz_serve.pipelines.accel import (
    AccelerationOptions,
    apply_acceleration,
    check_attention_backend_name,
    inference_dtype,
)
from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    ImageRequest,
    LoraWeight,
    StepCallback,
)
from ourvidz_serve.pipelines.devices import random_init, resolve_device
from ourvidz_serve.pipelines.encode import encode_png
from ourvidz_serve.pipelines.lora import (
    Adapters,
    HotswapAdapters,
    LoraCache,
    LoraNotLoaded,
    LoraStats,
    ParsedLora,
    PipelineAdapters,
    hotswap_unet_layers,
    parse_sdxl_lora,
    sdxl_lora_layers,
    sha256_digest,
)
from ourvidz_serve.pipelines.oom import OOMSplitter
from ourvidz_serve.pipelines.tokenizers import clip_tokenizer
from ourvidz_serve.settings import ModelProfile, Settings

logger = logging.getLogger(__name__)

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

# The image encoder of h94/IP-Adapter's sdxl_models (OpenCLIP ViT-bigG/14's vision tower),
# which ip-adapter_sdxl.safetensors projects from; written out so no download is needed.
SDXL_IP_ADAPTER_IMAGE_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
# As diffusers' IP-Adapter tests, at 32x32 pixels in 4x4 patches to keep a step cheap.
TINY_IMAGE_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
}
IP_ADAPTER_TOKENS = 4
"""Image tokens of the original IP-Adapter (``proj`` maps one CLIP embedding to four)."""


@dataclass(frozen=True)
class SDXLConfigs:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    image_encoder: dict[str, Any] | None = None
    """CLIP vision config of the random IP-Adapter's image encoder; None: no adapter."""


SDXL_BASE_CONFIGS = SDXLConfigs(
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_IP_ADAPTER_IMAGE_ENCODER_CONFIG,
)
TINY_CONFIGS = SDXLConfigs(
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_IMAGE_ENCODER_CONFIG,
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


# --- IP-Adapter -------------------------------------------------------------------------


@dataclass
class RandomIPAdapter:
    """An IP-Adapter in h94/IP-Adapter's checkpoint layout, with its image encoder."""

    state_dict: dict[str, dict[str, torch.Tensor]]
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessor


def build_random_ip_adapter(
    unet: UNet2DConditionModel,
    image_encoder_config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 1,
) -> RandomIPAdapter:
    """A random original IP-Adapter (4 image tokens) for ``unet``, as diffusers' tests build one.

    The keys are those of ``ip-adapter_sdxl.safetensors``: ``image_proj`` (``proj``, ``norm``)
    and ``ip_adapter`` (``{n}.to_k_ip`` / ``{n}.to_v_ip`` for the n-th cross-attention, n odd),
    so ``load_ip_adapter`` converts it exactly as it converts the published weights.
    """
    config = CLIPVisionConfig(**image_encoder_config)
    ip_layers: dict[str, torch.Tensor] = {}
    with random_init(device, dtype, seed):
        image_encoder = CLIPVisionModelWithProjection(config).eval()
        projection = ImageProjection(
            image_embed_dim=config.projection_dim,
            cross_attention_dim=unet.config["cross_attention_dim"],
            num_image_text_embeds=IP_ADAPTER_TOKENS,
        )
        key_id = 1  # diffusers numbers the UNet's attention layers 0, 1, ...; cross ones are odd
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            # The adapter's keys and values project like the layer's text ones.
            to_k = unet.get_submodule(name.replace(".processor", ".to_k"))
            assert isinstance(to_k, torch.nn.Linear)
            for kind in ("to_k_ip", "to_v_ip"):
                layer = torch.nn.Linear(to_k.in_features, to_k.out_features, bias=False)
                ip_layers[f"{key_id}.{kind}.weight"] = layer.weight.detach()
            key_id += 2
    image_proj = {
        "proj.weight": projection.image_embeds.weight.detach(),
        "proj.bias": projection.image_embeds.bias.detach(),
        "norm.weight": projection.norm.weight.detach(),
        "norm.bias": projection.norm.bias.detach(),
    }
    processor = CLIPImageProcessor(size=config.image_size, crop_size=config.image_size)
    return RandomIPAdapter(
        {"image_proj": image_proj, "ip_adapter": ip_layers}, image_encoder, processor
    )


def attach_ip_adapter(pipe: StableDiffusionXLPipeline, adapter: RandomIPAdapter) -> None:
    """Load ``adapter`` into ``pipe``'s UNet through diffusers' own ``load_ip_adapter``."""
    pipe.register_modules(
        image_encoder=adapter.image_encoder, feature_extractor=adapter.feature_extractor
    )
    # diffusers annotates a flat dict; it takes the nested {"image_proj", "ip_adapter"} one.
    state_dict: Any = adapter.state_dict
    pipe.load_ip_adapter(state_dict, subfolder="", weight_name="")


def load_ip_adapter_weights(pipe: StableDiffusionXLPipeline, path: Path, weight_name: str) -> None:
    """An IP-Adapter from a local copy of h94/IP-Adapter (offline): ``sdxl_models/{weight_name}``
    with the image encoder it was trained on (ViT-H under ``models/`` for ``*vit-h*``)."""
    weights = path / "sdxl_models" / weight_name
    encoder = (
        "models/image_encoder" if "vit-h" in weight_name.lower() else "sdxl_models/image_encoder"
    )
    if not weights.is_file():
        raise ModelLoadError(
            f"IP-Adapter weights {weights} do not exist (OURVIDZ_SDXL_IP_ADAPTER, "
            "OURVIDZ_SDXL_IP_ADAPTER_WEIGHT_NAME); unset OURVIDZ_SDXL_IP_ADAPTER to run the "
            "'style' and 'character' references as plain image-to-image"
        )
    if not (path / encoder).is_dir():
        raise ModelLoadError(f"the IP-Adapter's image encoder {path / encoder} does not exist")
    try:
        pipe.load_ip_adapter(
            str(path),
            subfolder="sdxl_models",
            weight_name=weight_name,
            image_encoder_folder=encoder,
            local_files_only=True,
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load the IP-Adapter from {weights}: {exc}") from exc


def has_ip_adapter(unet: UNet2DConditionModel) -> bool:
    """Whether an IP-Adapter is loaded (the UNet then needs image embeddings on every call)."""
    # load_ip_adapter sets the frozen config's attribute, not its item: read it as the UNet does.
    hid_type = getattr(unet.config, "encoder_hid_dim_type", None)
    return unet.encoder_hid_proj is not None and hid_type == "ip_image_proj"


def instant_style_scale(unet: UNet2DConditionModel, scale: float) -> dict[str, Any]:
    """``scale`` on InstantStyle's style layer only: the second attention of the first up block.

    That layer carries colour and texture; the layout layers (down blocks) get nothing, so the
    reference's composition does not leak in (Wang et al., InstantStyle, 2024).
    """
    first_up = next(i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions"))
    per_layer = [0.0] * (unet.config["layers_per_block"] + 1)
    per_layer[min(1, len(per_layer) - 1)] = scale
    return {"up": {f"block_{first_up}": per_layer}}


class SDXLReferencePipeline(StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image whose IP-Adapter images are one per prompt.

    diffusers gives every prompt of a batch all of ``ip_adapter_image``; here
    ``ip_adapter_image[k][i]`` is adapter k's image for prompt i, so requests with different
    references share one batched call. Precomputed ``ip_adapter_image_embeds`` keep
    diffusers' meaning (shared by the batch).
    """

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: Any,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> list[torch.Tensor]:
        if ip_adapter_image_embeds is not None:
            return super().prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
            )
        layers = self.unet.encoder_hid_proj.image_projection_layers
        if len(ip_adapter_image) != len(layers):
            raise ValueError(f"{len(ip_adapter_image)} image lists for {len(layers)} IP-Adapters")
        embeds = []
        # The caller passes batch_size x num_images_per_prompt here: one image per output.
        for images, layer in zip(ip_adapter_image, layers, strict=True):
            if len(images) != num_images_per_prompt:
                raise ValueError(
                    f"{len(images)} IP-Adapter images for {num_images_per_prompt} prompts"
                )
            hidden_states = not isinstance(layer, ImageProjection)
            positive, negative = self.encode_image(images, device, 1, hidden_states)
            positive, negative = positive[:, None], negative[:, None]  # one image per prompt
            if do_classifier_free_guidance:
                positive = torch.cat([negative, positive])
            embeds.append(positive.to(device))
        return embeds


# --- Reference types ----------------------------------------------------------------------


class Framing(StrEnum):
    LETTERBOX = "letterbox"
    """The whole reference, scaled to fit, centred on bars of its own mean colour."""
    COVER = "cover"
    """Scaled to cover the output, the overflow cropped evenly from both sides."""


@dataclass(frozen=True)
class ReferenceMode:
    """How one reference type steers SDXL: framing, img2img strength and IP-Adapter weight."""

    framing: Framing
    bleed: float
    """Fraction cut from every edge before framing; > 0 frames a centred subject larger."""
    denoise: tuple[float, float]
    """img2img strength at reference_strength 0 and at 1, linear in between (the second is
    lower: a stronger reference leaves less to redraw)."""
    ip_adapter_scale: float
    """IP-Adapter weight when one is loaded; 0: the adapter is off for this type."""
    ip_adapter_style_only: bool = False
    """Weight only InstantStyle's style layer (colour, texture), not the layout layers."""

    def denoising_strength(self, reference_strength: float) -> float:
        low, high = self.denoise
        return low + (high - low) * reference_strength

    def denoising_steps(self, steps: int, reference_strength: float) -> int:
        """Steps diffusers' SDXL img2img runs: ``int(steps x strength)`` (``get_timesteps``)."""
        return min(int(steps * self.denoising_strength(reference_strength)), steps)

    def frame(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """The reference at the output ``size`` (width, height), framed for this type."""
        if self.framing is Framing.LETTERBOX:
            fitted = ImageOps.contain(image, size, Image.Resampling.LANCZOS)
            mean = ImageStat.Stat(image).mean
            fill = (round(mean[0]), round(mean[1]), round(mean[2]))
            canvas = Image.new("RGB", size, fill)
            canvas.paste(fitted, ((size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2))
            return canvas
        return ImageOps.fit(image, size, Image.Resampling.LANCZOS, bleed=self.bleed)

    def adapter_scale(self, unet: UNet2DConditionModel) -> float | dict[str, Any]:
        """The argument for ``set_ip_adapter_scale`` while this type runs."""
        if self.ip_adapter_style_only:
            return instant_style_scale(unet, self.ip_adapter_scale)
        return self.ip_adapter_scale


REFERENCE_MODES: dict[ReferenceType, ReferenceMode] = {
    ReferenceType.COMPOSITION: ReferenceMode(
        framing=Framing.LETTERBOX, bleed=0.0, denoise=(1.0, 0.3), ip_adapter_scale=0.0
    ),
    ReferenceType.STYLE: ReferenceMode(
        framing=Framing.COVER,
        bleed=0.0,
        denoise=(1.0, 0.6),
        ip_adapter_scale=1.0,
        ip_adapter_style_only=True,
    ),
    ReferenceType.CHARACTER: ReferenceMode(
        framing=Framing.COVER, bleed=0.1, denoise=(1.0, 0.4), ip_adapter_scale=0.8
    ),
}
"""What each ``reference_type`` does with the reference image (s = ``reference_strength``).

``reference_strength`` is how strongly the reference steers the image, as a user reads a
"reference strength" slider: 0.1 barely, 1.0 the most a type allows. Each type maps it
linearly to diffusers' img2img strength (the share of the noise schedule re-run over the
reference), ``denoise[0] + (denoise[1] - denoise[0]) x s``, from 1.0 (everything redrawn)
down to the type's floor; diffusers then runs ``int(steps x strength)`` denoising steps.

- ``composition``: the whole reference is kept: scaled to fit the output and letterboxed on
  bars of its mean colour (no new structure for the model to copy); img2img at 1 - 0.7 s
  (0.93..0.3, 0.51 at the default 0.7), the lowest floor of the three, so at high s the
  layout survives. No IP-Adapter: its tokens would pull the reference's content in too.
- ``style``: centre-cropped to cover the output; img2img at 1 - 0.4 s (0.96..0.6, 0.72 at
  0.7): always enough noise that the layout is redrawn from the prompt while the palette and
  texture of the initial latents carry over. With an IP-Adapter, weight 1.0 on
  InstantStyle's style layer only, which carries colour and texture, not layout.
- ``character``: cropped on the subject, which references usually centre: 10 % cut from
  every edge, then covered, so the subject fills more of the frame; img2img at 1 - 0.6 s
  (0.94..0.4, 0.58 at 0.7) to keep its appearance. With an IP-Adapter, weight 0.8 on every
  layer: identity and content of the subject, the prompt still steering the scene.

Without an IP-Adapter (``OURVIDZ_SDXL_IP_ADAPTER`` unset) style and character differ by
framing and strength only. The tiny profile always builds a small random one, so that its code
path runs everywhere; full-random builds ip-adapter_sdxl's architecture (4.4 GB in float16)
when ``OURVIDZ_SDXL_IP_ADAPTER`` is set, as the weights deployment it stands in for would.
"""


# --- Runner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    index: int
    request: ImageRequest
    width: int
    height: int
    reference: Image.Image | None
    """The reference framed at the output size for ``mode``; None for text-to-image."""
    mode: ReferenceMode | None

    @property
    def strength(self) -> float | None:
        """The img2img strength for this request's reference type."""
        if self.mode is None:
            return None
        return self.mode.denoising_strength(self.request.reference_strength)

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs this request runs with: (digest, scale) in the request's order.

        A LoRA at scale 0 is the base model, and is left out: such a request batches with
        requests without it, and its adapter is not put into the model for it.
        """
        return tuple((w.digest, float(w.scale)) for w in self.request.loras if w.scale != 0)

    @property
    def group_key(self) -> tuple[object, ...]:
        """Requests with equal keys run as one batched pipeline call."""
        r = self.request
        reference_type = r.reference_type if self.reference is not None else None
        return (
            r.steps,
            r.guidance_scale,
            self.width,
            self.height,
            reference_type,
            self.strength,
            r.negative_prompt is None,
            self.lora_key,
        )

    @property
    def denoising_steps(self) -> int:
        if self.mode is None:
            return self.request.steps
        return self.mode.denoising_steps(self.request.steps, self.request.reference_strength)


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


class _GroupProgress:
    """Reports one group's denoising steps to ``on_step`` as steps of the whole call.

    Without a split every step is reported once: ``offset + 1 .. offset + steps``. After an
    out-of-memory split the halves re-run the steps one after the other, and the group then
    advances by its share of image-steps done (``(finished x steps + running x step) //
    size``): still one report per step run (cancellation is checked as often), never lower
    than an earlier report, ending at ``offset + steps``; ``total`` never changes.
    """

    def __init__(
        self, on_step: StepCallback | None, offset: int, total: int, steps: int, size: int
    ) -> None:
        self._on_step = on_step
        self._offset, self._total, self._steps, self._size = offset, total, steps, size
        self._finished = 0
        self._reported = 0

    def step(self, running: int, step: int) -> None:
        done = (self._finished * self._steps + running * step) // self._size
        self._reported = max(self._reported, done)
        if self._on_step is not None:
            self._on_step(self._offset + self._reported, self._total)

    def finish(self, images: int) -> None:
        self._finished += images


WARM_UP_SIZE = (1024, 1024)
"""Requested size of the warm-up calls: the job types' size (the tiny profile's native one)."""

_SETTING_DEFAULTS = Settings.model_fields
DEFAULT_LORA_CACHE: int = _SETTING_DEFAULTS["sdxl_lora_cache"].default
DEFAULT_LORA_MAX_RANK: int = _SETTING_DEFAULTS["sdxl_lora_max_rank"].default
DEFAULT_MAX_LORAS_PER_JOB: int = _SETTING_DEFAULTS["sdxl_max_loras_per_job"].default


class SDXLPipelineRunner:
    """Batched SDXL generation; one image's pixels depend only on its own request.

    LoRAs: ``add_lora`` parses a file into a CPU cache of ``lora_cache`` parsed adapters
    (least recently used evicted first); a request names cached ones by digest in
    ``ImageRequest.loras``. Before each pipeline call the runner puts that call's adapters into
    the model (both pipelines share the UNet and text encoders): see ``PipelineAdapters``, or
    with a compiled UNet ``HotswapAdapters`` (``max_loras_per_job`` slots at rank
    ``lora_max_rank``, hot-swapped without recompiling).
    """

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        *,
        profile: ModelProfile,
        device: torch.device,
        acceleration: AccelerationOptions | None = None,
        lora_cache: int = DEFAULT_LORA_CACHE,
        lora_max_rank: int = DEFAULT_LORA_MAX_RANK,
        max_loras_per_job: int = DEFAULT_MAX_LORAS_PER_JOB,
    ) -> None:
        self.profile = profile
        self.device = device
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.img2img = SDXLReferencePipeline(
            **self.pipe.components,
            force_zeros_for_empty_prompt=self.pipe.config["force_zeros_for_empty_prompt"],
            add_watermarker=False,
        )
        self.img2img.set_progress_bar_config(disable=True)
        # Both pipelines share one scheduler, UNet and VAE (whose dtype the pipelines switch).
        self._lock = threading.Lock()
        self._vae_dtype = self.pipe.vae.dtype
        self.ip_adapter = has_ip_adapter(self.pipe.unet)
        self._ip_embedding: tuple[torch.Size, torch.dtype] | None = None
        if self.ip_adapter:
            self._ip_embedding = self._probe_ip_embedding()
        self.oom = OOMSplitter("SDXL")
        """Out-of-memory splits of this runner's pipeline calls (``splits``, ``exhausted``)."""
        options = acceleration or AccelerationOptions()
        if lora_cache < max_loras_per_job:
            logger.warning(
                "the SDXL LoRA cache holds %d LoRAs, fewer than the %d one image may use: "
                "such an image can never run",
                lora_cache,
                max_loras_per_job,
            )
        self.lora_max_rank = lora_max_rank
        self.max_loras_per_job = max_loras_per_job
        self._loras = LoraCache(lora_cache)
        self._unet_config = self.pipe.unet.config
        self._lora_dtype = self.pipe.unet.dtype
        # The layers' shapes before any adapter wraps them; add_lora reads only this copy.
        self._lora_layers = sdxl_lora_layers(self.pipe)
        self._hotswap_layers: set[str] | None = None
        self._adapters: PipelineAdapters | HotswapAdapters
        if options.torch_compile:
            # Slots before compiling: the compiled code then never meets a new adapter.
            self._hotswap_layers = hotswap_unet_layers(self._lora_layers)
            self._adapters = HotswapAdapters(
                self.pipe,
                slots=max_loras_per_job,
                target_rank=lora_max_rank,
                layers=self._hotswap_layers,
            )
        else:
            self._adapters = PipelineAdapters(self.pipe)
        self._active_loras: tuple[tuple[str, float], ...] | None = ()
        """The adapters in the model now; None after a failed activation (unknown)."""
        self._activations = 0
        self._switches = 0
        self.acceleration = apply_acceleration(self.pipe, self.pipe.unet, options, device)
        """What dtype, attention, layout, VAE and compile settings this runner applied."""
        self.acceleration["warm_up_s"] = None

    @classmethod
    def build(cls, settings: Settings, *, compile_backend: str = "inductor") -> SDXLPipelineRunner:
        """The runner of ``settings.model_profile``, accelerated and, compiled or on CUDA, warm."""
        check_attention_backend_name(settings.attention_backend)  # before minutes of loading
        device = resolve_device(settings.device)
        # On CUDA the VAE stays float16 with force_upcast: diffusers decodes in float32.
        dtype = inference_dtype(device, torch.float16)
        profile = settings.model_profile
        if profile is ModelProfile.WEIGHTS:
            pipe = load_sdxl_pipeline(settings.sdxl_checkpoint, dtype)
            if settings.sdxl_ip_adapter is not None:
                load_ip_adapter_weights(
                    pipe, settings.sdxl_ip_adapter, settings.sdxl_ip_adapter_weight_name
                )
        else:
            configs = TINY_CONFIGS if profile is ModelProfile.TINY else SDXL_BASE_CONFIGS
            pipe = build_random_sdxl_pipeline(configs, device, dtype)
            # Full-random matches the footprint of the weights deployment it stands in for
            # (and the memory plan): an adapter only where one is configured.
            with_adapter = profile is ModelProfile.TINY or settings.sdxl_ip_adapter is not None
            if with_adapter and configs.image_encoder is not None:
                adapter = build_random_ip_adapter(pipe.unet, configs.image_encoder, device, dtype)
                attach_ip_adapter(pipe, adapter)
        options = AccelerationOptions.from_settings(settings, compile_backend=compile_backend)
        runner = cls(
            pipe,
            profile=profile,
            device=device,
            acceleration=options,
            lora_cache=settings.sdxl_lora_cache,
            lora_max_rank=settings.sdxl_lora_max_rank,
            max_loras_per_job=settings.sdxl_max_loras_per_job,
        )
        if runner.acceleration["compiled"] or device.type == "cuda":
            runner.warm_up()
        return runner

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the produced image: the tiny profile's native size, else as asked."""
        if self.profile is ModelProfile.TINY:
            return TINY_SIZE
        return width, height

    def warm_up(self) -> float:
        """Run every kind of call once so compiling and kernel tuning happen before traffic.

        Text-to-image with one and three images, and each reference type with three:
        compiled code is specialised on the IP-Adapter weights, which differ per type. Three,
        not two: two images under guidance make a batch of 4, the adapter's token count, and
        Dynamo would tie the two sizes together and recompile for every other batch size.
        A compiled UNet with LoRA slots runs every call twice, with its LoRA layers disabled
        and enabled (a zero LoRA in a slot), its two variants. Returns the seconds taken.
        """
        width, height = WARM_UP_SIZE
        gradient = np.linspace(0, 255, 64, dtype=np.uint8)
        pixels = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:, None], 128), axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")

        def request(seed: int, **changes: Any) -> ImageRequest:
            fields: dict[str, Any] = {
                "prompt": "warm-up",
                "negative_prompt": "warm-up",
                "seed": seed,
                "steps": 2,
                "guidance_scale": 5.0,
                "width": width,
                "height": height,
            }
            return ImageRequest(**(fields | changes))

        batches = [[request(0)], [request(seed) for seed in range(3)]]
        for reference_type in REFERENCE_MODES:
            reference = {
                "reference_image": buffer.getvalue(),
                # The weakest reference: the most denoising, so two steps still run one.
                "reference_strength": 0.1,
                "reference_type": reference_type,
            }
            batches.append([request(seed, **reference) for seed in range(3)])
        extra: dict[str, ParsedLora] = {}
        if isinstance(self._adapters, HotswapAdapters):
            zero = self._adapters.warm_up_lora()
            extra[zero.digest] = zero
            with_lora = (LoraWeight(zero.digest, 1.0),)
            batches += [[replace(r, loras=with_lora) for r in batch] for batch in batches]
        started = time.perf_counter()
        for batch in batches:
            self._generate([self._prepare(i, r) for i, r in enumerate(batch)], extra, None)
        elapsed = time.perf_counter() - started
        self._activations = self._switches = 0  # the counters are about traffic
        self.acceleration["warm_up_s"] = round(elapsed, 3)
        logger.info("SDXL warm-up: %d calls in %.1f s", len(batches), elapsed)
        return elapsed

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
        self._check_loras(index, request)
        width, height = self.output_size(request.width, request.height)
        if request.reference_image is None:
            return _Prepared(index, request, width, height, None, None)
        mode = REFERENCE_MODES.get(request.reference_type)
        if mode is None:
            known = ", ".join(REFERENCE_MODES)
            raise InvalidRequest(
                f"request {index}: reference_type {request.reference_type!r} is not one of {known}"
            )
        if not 0.0 < request.reference_strength <= 1.0:
            raise InvalidRequest(f"request {index}: reference_strength must be in (0, 1]")
        if mode.denoising_steps(request.steps, request.reference_strength) < 1:
            raise InvalidRequest(
                f"request {index}: {request.steps} steps at a {request.reference_type} "
                f"reference_strength of {request.reference_strength} leave no denoising step "
                f"(img2img strength {mode.denoising_strength(request.reference_strength):.2f})"
            )
        image = _decode_reference(request.reference_image, index)
        return _Prepared(index, request, width, height, mode.frame(image, (width, height)), mode)

    def _check_loras(self, index: int, request: ImageRequest) -> None:
        loras = request.loras
        if len(loras) > self.max_loras_per_job:
            raise InvalidRequest(
                f"request {index}: {len(loras)} LoRAs; at most {self.max_loras_per_job} per image",
                param="loras",
            )
        seen: set[str] = set()
        for lora in loras:
            if not isinstance(lora.digest, str) or not lora.digest:
                raise InvalidRequest(f"request {index}: a LoRA has no digest", param="loras")
            if lora.digest in seen:
                raise InvalidRequest(
                    f"request {index}: LoRA {lora.digest[:12]} is named more than once",
                    param="loras",
                )
            seen.add(lora.digest)
            if not isinstance(lora.scale, int | float) or not math.isfinite(lora.scale):
                raise InvalidRequest(
                    f"request {index}: LoRA {lora.digest[:12]} has scale {lora.scale!r}; "
                    "a finite number is needed",
                    param="loras",
                )

    def _not_loaded(
        self, requests: Sequence[ImageRequest], missing: Sequence[str]
    ) -> LoraNotLoaded:
        digest = missing[0]
        index = next(i for i, r in enumerate(requests) if any(w.digest == digest for w in r.loras))
        return LoraNotLoaded(
            f"request {index}: LoRA {digest} is not loaded on this replica "
            f"({len(missing)} missing; add_lora first)",
            param="loras",
        )

    def add_lora(self, digest: str, data: bytes) -> None:
        """Parse the ``.safetensors`` LoRA ``data`` into the CPU cache under ``digest``.

        kohya and diffusers/PEFT namings load (diffusers' ``lora_state_dict`` converts them).
        A digest already cached is not parsed again, only marked most recently used. Raises
        LoraRejected (an InvalidRequest) when ``digest`` is not the data's sha256 or the data is
        not an SDXL LoRA this pipeline can run (names, shapes, rank above ``lora_max_rank``;
        with a compiled UNet, UNet layers outside the hot-swap slots: convolutions). Safe to
        call while ``generate`` runs in another thread; it touches no model.
        """

        def parse() -> ParsedLora:
            actual = sha256_digest(data)
            if actual != digest:
                raise LoraRejected(
                    f"LoRA {digest[:12]}: the data's sha256 is {actual[:12]}, not the digest given",
                    param="loras",
                )
            parsed = parse_sdxl_lora(
                data,
                digest=digest,
                layers=self._lora_layers,
                unet_config=self._unet_config,
                dtype=self._lora_dtype,
                max_rank=self.lora_max_rank,
                unet_layers=self._hotswap_layers,
                unet_layers_reason="this replica's UNet is compiled and hot-swaps LoRAs into "
                "its Linear layers only (convolution LoRAs such as LoCon need an uncompiled "
                "replica)",
            )
            return parsed.pinned() if self.device.type == "cuda" else parsed

        self._loras.add(digest, parse)

    def resident_loras(self) -> list[str]:
        """Digests of the LoRAs parsed in the CPU cache, least recently used first."""
        return self._loras.resident()

    def active_loras(self) -> list[str]:
        """Digests of the LoRAs in the model now (the last call's): a job applying these
        loads nothing. Read without the pipeline's lock: the claim loop asks while a call
        may run."""
        key = self._active_loras
        return [digest for digest, _ in key] if key else []

    @property
    def lora_stats(self) -> LoraStats:
        """Counters: ``loads`` and ``evictions`` of the CPU cache, ``activations`` (adapters
        put into the model) and ``switches`` (pipeline calls that changed the active set)."""
        return LoraStats(
            loads=self._loras.loads,
            evictions=self._loras.evictions,
            activations=self._activations,
            switches=self._switches,
        )

    def validate(self, requests: Sequence[ImageRequest]) -> None:
        """Raise InvalidRequest for any request ``generate`` would reject (no model time).

        That includes a LoRA not in the CPU cache (LoraNotLoaded), without marking any used.
        """
        for index, request in enumerate(requests):
            self._prepare(index, request)
        missing = self._loras.missing(dict.fromkeys(w.digest for r in requests for w in r.loras))
        if missing:
            raise self._not_loaded(requests, missing)

    def generate(
        self, requests: Sequence[ImageRequest], on_step: StepCallback | None = None
    ) -> list[EncodedAsset]:
        """PNG images in request order, one batched pipeline call per group of compatible requests.

        Every request is validated before any model time, its LoRAs included (all must be in
        the CPU cache; they are marked used). Requests share a call only when they have the
        same LoRAs at the same scales. ``on_step(done, total)`` counts denoising steps over all
        groups of this call (see ``_GroupProgress`` for a call split after running out of GPU
        memory); an exception it raises aborts the call.
        """
        prepared = [self._prepare(i, r) for i, r in enumerate(requests)]
        digests = dict.fromkeys(w.digest for r in requests for w in r.loras)
        try:
            # References held by this call: an eviction meanwhile cannot take them away.
            adapters = self._loras.take(digests)
        except KeyError as exc:
            raise self._not_loaded(requests, exc.args[0]) from None
        return self._generate(prepared, adapters, on_step)

    def _generate(
        self,
        prepared: list[_Prepared],
        adapters: dict[str, ParsedLora],
        on_step: StepCallback | None,
    ) -> list[EncodedAsset]:
        groups: dict[tuple[object, ...], list[_Prepared]] = {}
        for item in prepared:
            groups.setdefault(item.group_key, []).append(item)
        total = sum(group[0].denoising_steps for group in groups.values())
        pixels: dict[int, np.ndarray] = {}
        done = 0
        with self._lock:
            # A group whose adapters are in the model already goes first: one switch fewer.
            ordered = sorted(groups.values(), key=lambda g: g[0].lora_key != self._active_loras)
            for group in ordered:
                # Outside inference mode: adapter weights made inside it could not be
                # updated in place later (set_adapter, hot-swapping).
                self._activate(group[0].lora_key, adapters)
                steps = group[0].denoising_steps
                progress = _GroupProgress(on_step, done, total, steps, len(group))
                with torch.inference_mode():
                    images = self._run_group(group, progress)
                done += steps
                pixels.update(
                    (item.index, image) for item, image in zip(group, images, strict=True)
                )
        # The record states what was produced: each image's own shape, not the request's.
        return [
            EncodedAsset(
                data=encode_png(pixels[item.index]),
                mime_type="image/png",
                seed=item.request.seed,
                width=int(pixels[item.index].shape[1]),
                height=int(pixels[item.index].shape[0]),
            )
            for item in prepared
        ]

    def _activate(
        self, key: tuple[tuple[str, float], ...], adapters: dict[str, ParsedLora]
    ) -> None:
        """Put the adapters of ``key`` into the model at their scales (caller holds the lock)."""
        if key == self._active_loras:
            return
        self._switches += 1
        chosen: Adapters = [(adapters[digest], scale) for digest, scale in key]
        self._active_loras = None
        self._activations += self._adapters.activate(chosen)
        self._active_loras = key

    def _run_group(self, group: list[_Prepared], progress: _GroupProgress) -> list[np.ndarray]:
        """One pipeline call for ``group``, split in halves while the GPU runs out of memory.

        Every image has its own generator, re-seeded for each try, so a split changes no pixel.
        """
        first = group[0]
        return self.oom.run(
            group,
            lambda items: self._call(items, progress),
            unit=f"{first.width}x{first.height} image",
            restore=self._restore_after_oom,
        )

    def _call(self, items: Sequence[_Prepared], progress: _GroupProgress) -> list[np.ndarray]:
        first = items[0]
        negatives = None
        if first.request.negative_prompt is not None:
            negatives = [item.request.negative_prompt or "" for item in items]
        generators = [
            torch.Generator(device=self.device).manual_seed(item.request.seed) for item in items
        ]

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            progress.step(len(items), step + 1)
            return {}

        common: dict[str, Any] = {
            "prompt": [item.request.prompt for item in items],
            "negative_prompt": negatives,
            "num_inference_steps": first.request.steps,
            "guidance_scale": first.request.guidance_scale,
            "generator": generators,
            "output_type": "np",
            "callback_on_step_end": callback,
        }
        if self.ip_adapter:
            common |= self._ip_adapter_arguments(items)
        if first.mode is None:
            output = self.pipe(width=first.width, height=first.height, **common)
        else:
            output = self.img2img(
                image=[item.reference for item in items], strength=first.strength, **common
            )
        progress.finish(len(items))
        return list(output.images)

    def _ip_adapter_arguments(self, items: Sequence[_Prepared]) -> dict[str, Any]:
        """Set the adapter's weights for this call's reference type; its pipeline arguments.

        Once loaded, the UNet needs image embeddings on every call: calls without the adapter
        get zeros at weight 0, which diffusers' processors skip.
        """
        mode = items[0].mode
        if mode is not None and mode.ip_adapter_scale > 0:
            self.pipe.set_ip_adapter_scale(mode.adapter_scale(self.pipe.unet))
            return {"ip_adapter_image": [[item.reference for item in items]]}
        self.pipe.set_ip_adapter_scale(0.0)
        assert self._ip_embedding is not None
        shape, dtype = self._ip_embedding
        # diffusers splits precomputed embeddings into (negative, positive) under guidance.
        guided = items[0].request.guidance_scale > 1
        zeros = torch.zeros((2 if guided else 1, 1, *shape), dtype=dtype, device=self.device)
        return {"ip_adapter_image_embeds": [zeros]}

    def _probe_ip_embedding(self) -> tuple[torch.Size, torch.dtype]:
        """Shape and dtype of one image's embedding as the adapter's projection expects it."""
        layer = self.pipe.unet.encoder_hid_proj.image_projection_layers[0]
        hidden_states = not isinstance(layer, ImageProjection)
        with torch.inference_mode():
            embedding, _ = self.img2img.encode_image(
                Image.new("RGB", (64, 64)), self.device, 1, hidden_states
            )
        return embedding.shape[1:], embedding.dtype

    def _restore_after_oom(self) -> None:
        # A call that failed while decoding leaves a force_upcast VAE in float32.
        self.pipe.vae.to(dtype=self._vae_dtype)
