"""WAN 2.1 text-to-video (and single-frame images) on diffusers' WanPipeline."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from transformers import UMT5Config, UMT5EncoderModel

from ourvidz_serve.catalog import WAN_MAX_FRAMES, WAN_SAMPLE_SHIFT
from ourvidz_serve.errors import InvalidRequest, ModelLoadError
from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    StepCallback,
    VideoRequest,
)
from ourvidz_serve.pipelines.devices import random_init, resolve_device
from ourvidz_serve.pipelines.encode import encode_mp4, encode_png, encode_webp
from ourvidz_serve.pipelines.tokenizers import t5_tokenizer
from ourvidz_serve.settings import ModelProfile, Settings

MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MIN_SIZE, MAX_SIZE = 16, 1280
MAX_SEQUENCE_LENGTH = 512
TINY_SIZE = (64, 32)
"""Native (width, height) of the tiny profile; multiples of 16 as WAN and yuv420p need."""

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, written out so no download is needed.
WAN_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
WAN_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
UMT5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}

# The configs of diffusers' own WAN pipeline tests (text encoder: a tiny UMT5).
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
TINY_UMT5_CONFIG: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
}


@dataclass(frozen=True)
class WanConfigs:
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]


WAN_1_3B_CONFIGS = WanConfigs(WAN_TRANSFORMER_CONFIG, WAN_VAE_CONFIG, UMT5_XXL_CONFIG)
TINY_CONFIGS = WanConfigs(TINY_TRANSFORMER_CONFIG, TINY_VAE_CONFIG, TINY_UMT5_CONFIG)


def make_wan_scheduler() -> UniPCMultistepScheduler:
    """The contract's sampler: UniPC on flow-matching sigmas with shift 5.0."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=WAN_SAMPLE_SHIFT,
    )


def keep_fp32_modules(model: torch.nn.Module) -> None:
    """Upcast the parameters diffusers keeps in float32 when it loads reduced-precision weights.

    (WAN: rope, time embedder, modulation tables and norms), so random builds match loaded ones.
    """
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        if keep.intersection(name.split(".")):
            parameter.data = parameter.data.float()


def build_random_wan_pipeline(
    configs: WanConfigs,
    device: torch.device,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    seed: int = 0,
) -> WanPipeline:
    """A WAN pipeline with random weights created directly on ``device`` (meta works too)."""
    tokenizer = t5_tokenizer(MAX_SEQUENCE_LENGTH)
    vocab_size = max(configs.text_encoder.get("vocab_size", 0), len(tokenizer))
    text_config = UMT5Config(
        **{**configs.text_encoder, "vocab_size": vocab_size},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    with random_init(device, dtype, seed):
        transformer = WanTransformer3DModel(**configs.transformer)
        text_encoder = UMT5EncoderModel(text_config)
    keep_fp32_modules(transformer)
    with random_init(device, vae_dtype, seed + 1):
        vae = AutoencoderKLWan(**configs.vae)
    # diffusers' hints name AutoTokenizer and FlowMatchEulerDiscreteScheduler; WAN 2.1 ships
    # a T5 tokenizer and UniPC, which the pipeline calls through the same interfaces.
    components: dict[str, Any] = {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "vae": vae.eval(),
        "transformer": transformer.eval(),
        "scheduler": make_wan_scheduler(),
    }
    return WanPipeline(**components)


def load_wan_pipeline(path: Path | None, dtype: torch.dtype, vae_dtype: torch.dtype) -> WanPipeline:
    """Real weights from a local diffusers folder (e.g. Wan2.1-T2V-1.3B-Diffusers), offline."""
    if path is None:
        raise ModelLoadError(
            "OURVIDZ_WAN_MODEL_DIR is not set: the weights profile needs a local WAN 2.1 "
            "diffusers folder (e.g. Wan2.1-T2V-1.3B-Diffusers)"
        )
    if not path.is_dir():
        raise ModelLoadError(f"WAN model directory {path} does not exist")
    try:
        vae = AutoencoderKLWan.from_pretrained(
            str(path), subfolder="vae", dtype=vae_dtype, local_files_only=True
        )
        pipe = WanPipeline.from_pretrained(str(path), vae=vae, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load WAN weights from {path}: {exc}") from exc
    pipe.scheduler = make_wan_scheduler()
    return pipe


class WanPipelineRunner:
    """One WAN output per call: a PNG for one frame, else an H.264 MP4 with every frame."""

    def __init__(self, pipe: WanPipeline, *, profile: ModelProfile, device: torch.device) -> None:
        self.profile = profile
        self.device = device
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self._lock = threading.Lock()

    @classmethod
    def build(cls, settings: Settings) -> WanPipelineRunner:
        device = resolve_device(settings.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae_dtype = torch.float32
        profile = settings.model_profile
        if profile is ModelProfile.TINY:
            pipe = build_random_wan_pipeline(TINY_CONFIGS, device, dtype, vae_dtype)
        elif profile is ModelProfile.FULL_RANDOM:
            pipe = build_random_wan_pipeline(WAN_1_3B_CONFIGS, device, dtype, vae_dtype)
        else:
            pipe = load_wan_pipeline(settings.wan_model_dir, dtype, vae_dtype)
        return cls(pipe, profile=profile, device=device)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the output: the tiny profile's native size, else as asked."""
        if self.profile is ModelProfile.TINY:
            return TINY_SIZE
        return width, height

    @staticmethod
    def validate(request: VideoRequest) -> None:
        """Raise InvalidRequest for anything the pipeline would reject or silently change."""
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidRequest("the prompt is empty")
        if not 1 <= request.num_frames <= WAN_MAX_FRAMES or (request.num_frames - 1) % 4:
            raise InvalidRequest(
                f"num_frames must be 4k+1 in 1..{WAN_MAX_FRAMES}, got {request.num_frames}"
            )
        if not 1 <= request.steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be 1..{MAX_STEPS}")
        if not 0.0 <= request.guidance_scale <= MAX_GUIDANCE:
            raise InvalidRequest(f"guidance_scale must be 0..{MAX_GUIDANCE}")
        if request.num_frames > 1 and not 1 <= request.fps <= 60:
            raise InvalidRequest("fps must be 1..60")
        for name, value in (("width", request.width), ("height", request.height)):
            if not MIN_SIZE <= value <= MAX_SIZE or value % 16:
                raise InvalidRequest(
                    f"{name} must be a multiple of 16 in {MIN_SIZE}..{MAX_SIZE}, got {value}"
                )

    def generate(self, request: VideoRequest, on_step: StepCallback | None = None) -> EncodedAsset:
        """Generate and encode one output. ``on_step`` may raise to abort at a step boundary."""
        self.validate(request)
        width, height = self.output_size(request.width, request.height)
        frames = self._run(request, width, height, on_step)
        if request.num_frames == 1:
            return EncodedAsset(
                data=encode_png(frames[0]),
                mime_type="image/png",
                seed=request.seed,
                width=width,
                height=height,
            )
        return EncodedAsset(
            data=encode_mp4(frames, request.fps),
            mime_type="video/mp4",
            seed=request.seed,
            width=width,
            height=height,
            num_frames=len(frames),
            poster=encode_webp(frames[0]),
        )

    def _run(
        self, request: VideoRequest, width: int, height: int, on_step: StepCallback | None
    ) -> np.ndarray:
        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            if on_step is not None:
                on_step(step + 1, request.steps)
            return {}

        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        with self._lock, torch.inference_mode():
            output = self.pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                height=height,
                width=width,
                num_frames=request.num_frames,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                output_type="np",
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                callback_on_step_end=callback,
            )
        frames = np.asarray(output.frames[0])
        if frames.shape[0] != request.num_frames:
            raise RuntimeError(f"WAN produced {frames.shape[0]} frames, not {request.num_frames}")
        return frames
