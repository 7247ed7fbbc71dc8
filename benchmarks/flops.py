"""Physical limits: FLOP counts of the real architectures, counted on the ``meta`` device.

Reproduces the table "Physical limits (FLOP counts of the real architectures, on the meta
device)" of PERFORMANCE.md, and prints each figure next to the one stated there.

    .venv/bin/python benchmarks/flops.py [--only sdxl] [--only wan] [--only qwen]

How it counts:

- The models are the package's own full-size configs (``SDXL_BASE_CONFIGS``,
  ``WAN_1_3B_CONFIGS``, ``QWEN25_7B_CONFIG``), built in bf16 on the ``meta`` device with the
  package's ``random_init`` (no weights are allocated; every tensor is a meta tensor). All of
  them run on plain ``meta`` tensors, no FakeTensorMode needed, with one workaround: Qwen2 is
  given a ready 4D attention mask, since building its causal mask calls ``.item()``, which
  meta tensors refuse.
- FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOP per multiply-add;
  convolutions, matmuls and attention only, so norms and activations are left out).
  Attention on ``meta`` runs SDPA's math path, which the counter sees as ``bmm``.
- Classifier-free guidance doubles the batch: one UNet/transformer step is counted at batch 2.
- Steps and sizes come from the catalog's job types (``sdxl_image_fast``,
  ``sdxl_image_high``, ``video_high``, ``image_high``).
- Per-step rows are the UNet / transformer only. SDXL job totals are steps + VAE decode (as in
  PERFORMANCE.md); the WAN totals are transformer steps only (as in PERFORMANCE.md), and the
  WAN VAE decode is printed on its own rows. Text encoders are in no total: they run once per
  job and are printed on their own rows, per prompt (with CFG, WAN always encodes a negative
  prompt too, and SDXL does unless it is None, which it zeroes: up to twice the figure a job).
- Qwen2.5-7B decoding at batch 1 is bound by reading the bf16 weights once per new token:
  bytes = 2 x parameter count; the FLOP row beside it shows the compute bound is far lower.

Time bounds: 989 TF/s (H100 SXM, bf16 dense) and 364 TF/s (RTX 6000 Ada); memory bounds:
3.35 TB/s (H100 SXM) and 0.96 TB/s (RTX 6000 Ada). Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2Config,
    Qwen2ForCausalLM,
    UMT5Config,
    UMT5EncoderModel,
)

from ourvidz_serve.catalog import JOB_TYPES
from ourvidz_serve.pipelines.devices import random_init
from ourvidz_serve.pipelines.qwen import QWEN25_7B_CONFIG
from ourvidz_serve.pipelines.sdxl import SDXL_BASE_CONFIGS
from ourvidz_serve.pipelines.wan import MAX_SEQUENCE_LENGTH, WAN_1_3B_CONFIGS

META = torch.device("meta")
DTYPE = torch.bfloat16
CFG_BATCH = 2
"""Classifier-free guidance: conditional and unconditional branches in one batch."""

H100_FLOPS = 989e12
"""H100 SXM, bf16 dense tensor cores."""
ADA_FLOPS = 364e12
"""RTX 6000 Ada, bf16 dense tensor cores (approximate)."""
H100_BYTES_PER_S = 3.35e12
ADA_BYTES_PER_S = 0.96e12

CLIP_TOKENS = 77
QWEN_NEW_TOKENS = 200

SDXL_FAST = JOB_TYPES["sdxl_image_fast"]
SDXL_HIGH = JOB_TYPES["sdxl_image_high"]
WAN_VIDEO_HIGH = JOB_TYPES["video_high"]
WAN_IMAGE_HIGH = JOB_TYPES["image_high"]


@dataclass(frozen=True)
class Stated:
    """A row of PERFORMANCE.md: the amount (FLOP or bytes) and the two time bounds."""

    amount: float
    h100_s: float
    ada_s: float


@dataclass(frozen=True)
class Row:
    work: str
    amount: float
    unit: str  # "FLOP" (compute-bound) or "B" (bytes read: memory-bound)
    stated: Stated | None = None
    times: int = 1
    """How often ``amount`` is spent within the time bound (new tokens, for the Qwen rows)."""

    def seconds(self) -> tuple[float, float]:
        total = self.amount * self.times
        if self.unit == "B":
            return total / H100_BYTES_PER_S, total / ADA_BYTES_PER_S
        return total / H100_FLOPS, total / ADA_FLOPS


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


def meta(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.empty(shape, device=META, dtype=dtype)


def timesteps(batch: int) -> torch.Tensor:
    return torch.full((batch,), 500.0, device=META)


def token_ids(batch: int, length: int) -> torch.Tensor:
    return torch.zeros((batch, length), device=META, dtype=torch.long)


# --- SDXL ----------------------------------------------------------------------------------


def sdxl_latent_hw(width: int, height: int) -> tuple[int, int]:
    return height // 8, width // 8


def sdxl_unet_step_flops(unet: UNet2DConditionModel, width: int, height: int) -> int:
    h, w = sdxl_latent_hw(width, height)
    text_embeds_dim = SDXL_BASE_CONFIGS.text_encoder_2["projection_dim"]
    cross_dim = SDXL_BASE_CONFIGS.unet["cross_attention_dim"]
    return count_flops(
        lambda: unet(
            meta(CFG_BATCH, unet.config.in_channels, h, w),
            timesteps(CFG_BATCH),
            encoder_hidden_states=meta(CFG_BATCH, CLIP_TOKENS, cross_dim),
            added_cond_kwargs={
                "text_embeds": meta(CFG_BATCH, text_embeds_dim),
                "time_ids": meta(CFG_BATCH, 6),
            },
        )
    )


def sdxl_vae_decode_flops(vae: AutoencoderKL, width: int, height: int) -> int:
    h, w = sdxl_latent_hw(width, height)
    return count_flops(lambda: vae.decode(meta(1, vae.config.latent_channels, h, w)))


def clip_config(config: dict) -> CLIPTextConfig:
    return CLIPTextConfig(**config)


def sdxl_text_encoders_flops() -> int:
    with random_init(META, DTYPE):
        encoder = CLIPTextModel(clip_config(SDXL_BASE_CONFIGS.text_encoder)).eval()
        encoder_2 = CLIPTextModelWithProjection(
            clip_config(SDXL_BASE_CONFIGS.text_encoder_2)
        ).eval()
    ids = token_ids(1, CLIP_TOKENS)
    return count_flops(lambda: encoder(ids)) + count_flops(lambda: encoder_2(ids))


def sdxl_rows() -> list[Row]:
    with random_init(META, DTYPE):
        unet = UNet2DConditionModel(**SDXL_BASE_CONFIGS.unet).eval()
        vae = AutoencoderKL(**SDXL_BASE_CONFIGS.vae).eval()
    assert (SDXL_FAST.width, SDXL_FAST.height) == (SDXL_HIGH.width, SDXL_HIGH.height)
    width, height = SDXL_FAST.width, SDXL_FAST.height
    step = sdxl_unet_step_flops(unet, width, height)
    decode = sdxl_vae_decode_flops(vae, width, height)
    size = f"{width}x{height}"
    return [
        Row(f"SDXL UNet step, {size}, CFG", step, "FLOP", Stated(13.5e12, 0.014, 0.037)),
        Row(f"SDXL VAE decode, {size}", decode, "FLOP", Stated(10.5e12, 0.011, 0.029)),
        Row(
            f"sdxl_image_fast ({SDXL_FAST.steps} steps + decode)",
            SDXL_FAST.steps * step + decode,
            "FLOP",
            Stated(213e12, 0.22, 0.58),
        ),
        Row(
            f"sdxl_image_high ({SDXL_HIGH.steps} steps + decode)",
            SDXL_HIGH.steps * step + decode,
            "FLOP",
            Stated(349e12, 0.35, 0.96),
        ),
        Row(
            f"  SDXL text encoders CLIP-L + bigG, 1 prompt x {CLIP_TOKENS} tok",
            sdxl_text_encoders_flops(),
            "FLOP",
        ),
    ]


# --- WAN 2.1 1.3B --------------------------------------------------------------------------


def wan_latent_shape(num_frames: int, width: int, height: int) -> tuple[int, int, int]:
    """WAN's VAE: 4x temporal (first frame alone) and 8x spatial compression."""
    return (num_frames - 1) // 4 + 1, height // 8, width // 8


def wan_step_flops(transformer: WanTransformer3DModel, num_frames: int, w: int, h: int) -> int:
    f, lh, lw = wan_latent_shape(num_frames, w, h)
    text_dim = WAN_1_3B_CONFIGS.transformer["text_dim"]
    return count_flops(
        lambda: transformer(
            meta(CFG_BATCH, transformer.config.in_channels, f, lh, lw),
            timesteps(CFG_BATCH),
            meta(CFG_BATCH, MAX_SEQUENCE_LENGTH, text_dim),
        )
    )


def wan_vae_decode_flops(vae: AutoencoderKLWan, num_frames: int, w: int, h: int) -> int:
    f, lh, lw = wan_latent_shape(num_frames, w, h)
    return count_flops(lambda: vae.decode(meta(1, vae.config.z_dim, f, lh, lw)))


def umt5_flops() -> int:
    with random_init(META, DTYPE):
        encoder = UMT5EncoderModel(UMT5Config(**WAN_1_3B_CONFIGS.text_encoder)).eval()
    return count_flops(lambda: encoder(token_ids(1, MAX_SEQUENCE_LENGTH)))


def wan_rows() -> list[Row]:
    with random_init(META, DTYPE):
        transformer = WanTransformer3DModel(**WAN_1_3B_CONFIGS.transformer).eval()
        vae = AutoencoderKLWan(**WAN_1_3B_CONFIGS.vae).eval()
    video, image = WAN_VIDEO_HIGH, WAN_IMAGE_HIGH
    video_step = wan_step_flops(transformer, video.num_frames, video.width, video.height)
    image_step = wan_step_flops(transformer, image.num_frames, image.width, image.height)
    video_decode = wan_vae_decode_flops(vae, video.num_frames, video.width, video.height)
    image_decode = wan_vae_decode_flops(vae, image.num_frames, image.width, image.height)
    video_size = f"{video.num_frames} frames {video.width}x{video.height}"
    image_size = f"one frame {image.width}x{image.height}"
    return [
        Row(f"WAN 1.3B step, {video_size}, CFG", video_step, "FLOP", Stated(566e12, 0.57, 1.6)),
        Row(
            f"video_high ({video.steps} steps)",
            video.steps * video_step,
            "FLOP",
            Stated(28.3e15, 29.0, 78.0),
        ),
        Row(
            f"WAN {image_size}, {image.steps} steps",
            image.steps * image_step,
            "FLOP",
            Stated(0.47e15, 0.5, 1.3),
        ),
        Row(f"  WAN VAE decode, {video_size}", video_decode, "FLOP"),
        Row(f"  WAN VAE decode, {image_size}", image_decode, "FLOP"),
        Row(
            f"  UMT5-XXL encoder, 1 prompt x {MAX_SEQUENCE_LENGTH} tok",
            umt5_flops(),
            "FLOP",
        ),
    ]


# --- Qwen2.5-7B ----------------------------------------------------------------------------


def qwen_rows() -> list[Row]:
    with random_init(META, DTYPE):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_7B_CONFIG)).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # One decode step at batch 1 (the KV-cache attention over a short context is negligible).
    # Workaround: a ready 4D attention mask, because building the causal mask from position ids
    # reads tensor values (``.item()``), which meta tensors do not have.
    mask = meta(1, 1, 1, 1)
    token_flops = count_flops(
        lambda: model(token_ids(1, 1), attention_mask=mask, use_cache=False, logits_to_keep=1)
    )
    n = QWEN_NEW_TOKENS
    return [
        Row(
            f"Qwen2.5-7B bf16 weight bytes/token; time: {n} new tokens, batch 1",
            weight_bytes,
            "B",
            Stated(15.2e9, 0.9, 3.2),
            times=n,
        ),
        Row(f"  Qwen2.5-7B FLOP/token; time: {n} new tokens", token_flops, "FLOP", times=n),
    ]


# --- Table ---------------------------------------------------------------------------------


def human(amount: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if amount >= scale:
            return f"{amount / scale:.3g} {prefix}{unit}"
    return f"{amount:.3g} {unit}"


def human_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 0.1 else f"{seconds:.3g} s"


def print_table(rows: list[Row]) -> None:
    header = (
        "work",
        "measured",
        "stated",
        "ratio",
        "H100 bound (stated)",
        "Ada bound (stated)",
    )
    lines = [header]
    for row in rows:
        h100, ada = row.seconds()
        stated = row.stated
        lines.append(
            (
                row.work,
                human(row.amount, row.unit),
                human(stated.amount, row.unit) if stated else "-",
                f"{row.amount / stated.amount:.3f}" if stated else "-",
                human_s(h100) + (f" ({human_s(stated.h100_s)})" if stated else ""),
                human_s(ada) + (f" ({human_s(stated.ada_s)})" if stated else ""),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        cells = [
            cell.ljust(width) if j == 0 else cell.rjust(width)
            for j, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        print(" | ".join(cells))
        if i == 0:
            print("-+-".join("-" * width for width in widths))


ROWS: dict[str, Callable[[], list[Row]]] = {"sdxl": sdxl_rows, "wan": wan_rows, "qwen": qwen_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=list(ROWS), action="append", help="these models' rows (default: all)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [row for name in args.only or list(ROWS) for row in ROWS[name]()]
    print_table(rows)
    off = [r for r in rows if r.stated and abs(r.amount / r.stated.amount - 1) > 0.05]
    print()
    print(
        "Time bounds: FLOP at 989 TF/s (H100 SXM bf16 dense) and 364 TF/s (RTX 6000 Ada); bytes\n"
        "at 3.35 TB/s (H100) and 0.96 TB/s (Ada). ratio = measured / stated in PERFORMANCE.md.\n"
        "Per-step rows: UNet/transformer only. SDXL job totals: steps + VAE decode; WAN totals:\n"
        "transformer steps only. Indented rows are in no total (text encoders: per prompt)."
    )
    print(
        "Rows off PERFORMANCE.md by more than 5%: "
        + (", ".join(r.work.strip() for r in off) if off else "none")
    )
    print(f"Counted on the meta device in {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
