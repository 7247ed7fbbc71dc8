"""WAN 2.1 text-to-video (and single-frame images) on diffusers' WanPipeline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from transformers import UMT5Config, UMT5EncoderModel

from ourvidz_serve.catalog import WAN_MAX_FRAMES, WAN_SAMPLE_SHIFT, StepCache
from ourvidz_serve.errors import InvalidRequest, ModelLoadError
from ourvidz_serve.pipelines.accel import (
    AccelerationOptions,
    apply_acceleration,
    check_attention_backend_name,
    inference_dtype,
)
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


STEP_CACHE_DEFAULTS: dict[StepCache, dict[str, Any]] = {
    StepCache.FIRST_BLOCK: {"threshold": 0.05},
    StepCache.MAG: {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
    StepCache.TAYLOR_SEER: {
        "use_lite_mode": True,
        "cache_interval": 5,
        "disable_cache_before_step": 3,
        "max_order": 1,
        "taylor_factors_dtype": torch.float32,
    },
}
"""diffusers' step caches on WAN's transformer, opt-in per job (``VideoRequest.step_cache``).

Each call builds its kind's config from these keyword arguments (``WanPipelineRunner``'s
``step_cache_options`` override them per kind) and removes the hooks afterwards. The hooks key
their state by the pipeline's ``cache_context`` ("cond" / "uncond"), so the two
classifier-free-guidance passes of a step are cached apart.

=============  ===========================================================================
cache          config, why these values, and what a cached forward call skips
=============  ===========================================================================
first_block    ``FirstBlockCacheConfig(threshold=0.05)``: diffusers' default, the cautious
               end (its docs show 0.2 for Qwen-Image and CogView4). Block 0 always runs;
               blocks 1..N-1 are replaced by their cached residual when block 0's residual
               changed by less than 5 % (relative abs-mean) since the last computed call.
mag            ``MagCacheConfig(threshold=0.06, max_skip_steps=3, retention_ratio=0.2,
               num_inference_steps=<the request's>, mag_ratios=<calibrated, below>)``:
               diffusers' defaults. Every block is skipped, reusing the previous residual,
               while the accumulated magnitude-ratio error stays under 0.06, at most 3 calls
               in a row and never in the first 20 % of the steps.
taylor_seer    ``TaylorSeerCacheConfig(use_lite_mode=True, cache_interval=5,
               disable_cache_before_step=3, max_order=1, taylor_factors_dtype=float32)``:
               diffusers' defaults but lite mode, because the default patterns
               (``^blocks.*attn``, matched in full) hook nothing on WAN, whose attentions are
               ``attn1`` / ``attn2``. Lite mode predicts ``proj_out``'s output with a
               first-order Taylor series and skips every block in 4 of each 5 steps after the
               first 3 (steps 0-2, 4, 9, 14, ... compute), storing one small tensor per
               order. Factors in float32, not diffusers' bfloat16, so the step-to-step
               differences they hold are not rounded away; in lite mode they are small.
=============  ===========================================================================

MagCache needs ``mag_ratios``: per step, the ratio of the block stack's residual magnitude to
the previous step's. They depend on the checkpoint and the scheduler, and diffusers ships them
for Flux only. A runner without them calibrates on its first ``mag`` call: that call runs in
full (no call skipped, the pixels of an uncached call) while forward hooks measure the ratios
with the formula of diffusers' ``MagCacheConfig(calibrate=True)`` mode (per token
``|r_t| / |r_t-1|``, averaged; r = block stack output - input), averaged over the cond and
uncond passes, as diffusers applies one array to both. Later calls use them, interpolated by
diffusers to their own step count. ``WanPipelineRunner(mag_ratios=...)`` takes ratios
calibrated elsewhere (``calibrate_mag_cache`` on a representative request returns them).
"""


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

    def __init__(
        self,
        pipe: WanPipeline,
        *,
        profile: ModelProfile,
        device: torch.device,
        step_cache_options: Mapping[StepCache, Mapping[str, Any]] | None = None,
        mag_ratios: Sequence[float] | None = None,
        acceleration: AccelerationOptions | None = None,
    ) -> None:
        self.profile = profile
        self.device = device
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self._lock = threading.Lock()
        self.acceleration = apply_acceleration(
            self.pipe, self.pipe.transformer, acceleration or AccelerationOptions(), device
        )
        """What dtype, attention, VAE and compile settings this runner applied."""
        self.acceleration["warm_up_s"] = None
        self._step_cache_options = {
            cache: {**STEP_CACHE_DEFAULTS[cache], **(step_cache_options or {}).get(cache, {})}
            for cache in StepCache
        }
        self.mag_ratios: list[float] | None = list(mag_ratios) if mag_ratios else None
        """MagCache's ratios; None until the first ``mag`` call calibrates them."""

    @classmethod
    def build(cls, settings: Settings, *, compile_backend: str = "inductor") -> WanPipelineRunner:
        """The runner of ``settings.model_profile``, accelerated and, compiled or on CUDA, warm."""
        check_attention_backend_name(settings.attention_backend)  # before minutes of loading
        device = resolve_device(settings.device)
        dtype = inference_dtype(device, torch.bfloat16)
        vae_dtype = torch.float32
        profile = settings.model_profile
        if profile is ModelProfile.TINY:
            pipe = build_random_wan_pipeline(TINY_CONFIGS, device, dtype, vae_dtype)
        elif profile is ModelProfile.FULL_RANDOM:
            pipe = build_random_wan_pipeline(WAN_1_3B_CONFIGS, device, dtype, vae_dtype)
        else:
            pipe = load_wan_pipeline(settings.wan_model_dir, dtype, vae_dtype)
        options = AccelerationOptions.from_settings(settings, compile_backend=compile_backend)
        runner = cls(pipe, profile=profile, device=device, acceleration=options)
        if runner.acceleration["compiled"] or device.type == "cuda":
            runner.warm_up()
        return runner

    def warm_up(self) -> float:
        """One image and one short video, so compiling and kernel tuning happen before traffic.

        Dynamic shapes are compiled on the first call; a cached job's first call of each cache
        kind may still recompile (its hooks change the traced code). Returns the seconds taken.
        """
        started = time.perf_counter()
        for frames in (1, 5):
            request = VideoRequest("warm-up", None, 0, 2, 5.0, 64, 32, frames)
            self.generate(request)
        elapsed = time.perf_counter() - started
        self.acceleration["warm_up_s"] = round(elapsed, 3)
        return elapsed

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
        return self.generate_with_stats(request, on_step)[0]

    def generate_with_stats(
        self, request: VideoRequest, on_step: StepCallback | None = None
    ) -> tuple[EncodedAsset, dict[str, Any]]:
        """``generate``, and what the request's step cache did, as job metadata.

        With a cache: ``step_cache_computed_calls`` / ``step_cache_skipped_calls``, the
        transformer forward calls (steps x CFG passes) whose block stack ran / was replaced by
        the cache (not counted when the transformer is compiled), and
        ``step_cache_calibration: True`` on the call that calibrated MagCache. Without one: an
        empty dict.
        """
        self.validate(request)
        width, height = self.output_size(request.width, request.height)
        frames, stats = self._run(request, width, height, on_step)
        # The record states what was produced: the frames' own shape, not the request's.
        produced_height, produced_width = frames.shape[1:3]
        if request.num_frames == 1:
            asset = EncodedAsset(
                data=encode_png(frames[0]),
                mime_type="image/png",
                seed=request.seed,
                width=produced_width,
                height=produced_height,
            )
        else:
            asset = EncodedAsset(
                data=encode_mp4(frames, request.fps),
                mime_type="video/mp4",
                seed=request.seed,
                width=produced_width,
                height=produced_height,
                num_frames=len(frames),
                poster=encode_webp(frames[0]),
            )
        return asset, stats

    def calibrate_mag_cache(self, request: VideoRequest) -> list[float]:
        """Run ``request`` in full, measure MagCache's ratios on it, keep and return them."""
        self.validate(request)
        width, height = self.output_size(request.width, request.height)
        self._run(request, width, height, None, calibrate=True)
        assert self.mag_ratios is not None
        return list(self.mag_ratios)

    def step_cache_config(
        self, cache: StepCache, steps: int
    ) -> FirstBlockCacheConfig | MagCacheConfig | TaylorSeerCacheConfig:
        """The diffusers config a call of ``steps`` steps with ``cache`` applies."""
        options = self._step_cache_options[cache]
        if cache is StepCache.FIRST_BLOCK:
            return FirstBlockCacheConfig(**options)
        if cache is StepCache.TAYLOR_SEER:
            return TaylorSeerCacheConfig(**options)
        if self.mag_ratios is None:
            raise RuntimeError("MagCache is not calibrated: run calibrate_mag_cache first")
        return MagCacheConfig(num_inference_steps=steps, mag_ratios=self.mag_ratios, **options)

    def _run(
        self,
        request: VideoRequest,
        width: int,
        height: int,
        on_step: StepCallback | None,
        calibrate: bool = False,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            if on_step is not None:
                on_step(step + 1, request.steps)
            return {}

        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        with (
            self._lock,
            torch.inference_mode(),
            self._step_cache(request, calibrate) as probe,
        ):
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
            stats = probe.stats() if probe is not None else {}
            if probe is not None and probe.magnitudes is not None:
                self.mag_ratios = probe.magnitudes.mag_ratios()
        frames = np.asarray(output.frames[0])
        if frames.shape[0] != request.num_frames:
            raise RuntimeError(f"WAN produced {frames.shape[0]} frames, not {request.num_frames}")
        return frames, stats

    @contextmanager
    def _step_cache(self, request: VideoRequest, calibrate: bool) -> Iterator[_CacheProbe | None]:
        """The request's step cache on the transformer for one call (the lock is held).

        The hooks go whatever happens, so the next call without a cache computes every block;
        new hooks start with empty state, so nothing carries over from an earlier call either.
        """
        transformer = self.pipe.transformer
        if transformer.is_cache_enabled:  # only if an earlier removal itself failed
            transformer.disable_cache()
        calibrate = calibrate or (request.step_cache is StepCache.MAG and self.mag_ratios is None)
        if request.step_cache is None and not calibrate:
            yield None
            return
        contexts = 2 if request.guidance_scale > 1.0 else 1  # WanPipeline's CFG condition
        # Compiled code does not call torch hooks registered after it was compiled (Dynamo's
        # skip_nnmodule_hook_guards): a compiled transformer's cached calls go uncounted, and
        # the calibration call, whose hooks must see every block, runs eagerly. (diffusers'
        # cache hooks replace ``forward`` instead, which Dynamo does guard on.)
        compiled = _is_compiled(transformer)
        probe = _CacheProbe(
            transformer,
            count=calibrate or not compiled,
            magnitudes=_Magnitudes(contexts) if calibrate else None,
        )
        try:
            with ExitStack() as stack:
                if calibrate and compiled:
                    stack.enter_context(torch.compiler.set_stance("force_eager"))
                if not calibrate:
                    assert request.step_cache is not None
                    config = self.step_cache_config(request.step_cache, request.steps)
                    transformer.enable_cache(config)
                yield probe
        finally:
            if transformer.is_cache_enabled:
                transformer.disable_cache()
            probe.remove()


def _is_compiled(transformer: WanTransformer3DModel) -> bool:
    """Whether ``nn.Module.compile`` (the whole model, or ``compile_repeated_blocks``) wraps the
    transformer or one of its blocks."""
    modules = (transformer, *transformer.blocks)
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in modules)


class _Magnitudes:
    """MagCache's calibration figures, as diffusers' ``MagCacheConfig(calibrate=True)`` takes
    them (``hooks/mag_cache.py``: ``_perform_calibration_step``), per CFG pass."""

    def __init__(self, contexts: int) -> None:
        self.contexts = contexts
        self.ratios: list[list[float]] = [[] for _ in range(contexts)]
        self._previous: list[torch.Tensor | None] = [None] * contexts

    def add(self, call: int, residual: torch.Tensor) -> None:
        context = call % self.contexts
        norms = torch.linalg.norm(residual.float(), dim=-1)
        previous = self._previous[context]
        ratio = 1.0 if previous is None else (norms / (previous + 1e-8)).mean().item()
        self.ratios[context].append(ratio)
        self._previous[context] = norms

    def mag_ratios(self) -> list[float]:
        """One ratio per step: the mean over the CFG passes."""
        return [sum(step) / len(step) for step in zip(*self.ratios, strict=True)]


class _CacheProbe:
    """Plain torch hooks that watch one call of the transformer under a diffusers cache.

    diffusers' cache hooks skip a block by replacing its ``forward``, so a torch hook on the
    block itself still fires; one on a submodule (the last block's FFN) fires only when the
    block really computes.
    """

    def __init__(
        self, transformer: WanTransformer3DModel, *, count: bool, magnitudes: _Magnitudes | None
    ) -> None:
        self.calls = 0
        self.computed = 0
        self.counted = count
        self.magnitudes = magnitudes
        self._head_input: torch.Tensor | None = None
        blocks = transformer.blocks
        self._handles = [transformer.register_forward_pre_hook(self._on_call)]
        if count:
            tail_ffn = blocks[-1].get_submodule("ffn")
            self._handles.append(tail_ffn.register_forward_hook(self._on_tail_computed))
        if magnitudes is not None:
            self._handles += [
                blocks[0].register_forward_pre_hook(self._on_head_input, with_kwargs=True),
                blocks[-1].register_forward_hook(self._on_tail_output),
            ]

    def _on_call(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1

    def _on_tail_computed(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.computed += 1

    def _on_head_input(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._head_input = args[0] if args else kwargs["hidden_states"]

    def _on_tail_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        assert self.magnitudes is not None and self._head_input is not None
        self.magnitudes.add(self.calls - 1, output - self._head_input)
        self._head_input = None

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.counted:
            stats["step_cache_computed_calls"] = self.computed
            stats["step_cache_skipped_calls"] = self.calls - self.computed
        if self.magnitudes is not None:
            stats["step_cache_calibration"] = True
        return stats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
