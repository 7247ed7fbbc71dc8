"""Small LoRA files for the registry's tests: real safetensors, SDXL tensor names, no model.

What runs on a pipeline is made by ``ourvidz_serve.pipelines.lora.random_sdxl_lora``; these
only have to pass (or fail) the upload's header checks.
"""

from __future__ import annotations

import torch
from safetensors.torch import save

UNET_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TEXT_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"
WIDTH = 32


def lora_file(
    *,
    rank: int = 4,
    dtype: torch.dtype = torch.float16,
    naming: str = "diffusers",
    module: str = UNET_MODULE,
    seed: int = 0,
) -> bytes:
    """A UNet-and-text-encoder LoRA of one module each, in diffusers or kohya naming."""
    generator = torch.Generator().manual_seed(seed)

    def pair() -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, WIDTH, generator=generator).to(dtype)
        up = torch.randn(WIDTH, rank, generator=generator).to(dtype)
        return down, up

    tensors: dict[str, torch.Tensor] = {}
    for prefix, kohya_prefix, path in (
        ("unet", "lora_unet", module),
        ("text_encoder", "lora_te1", TEXT_MODULE),
    ):
        down, up = pair()
        if naming == "kohya":
            name = f"{kohya_prefix}_{path.replace('.', '_')}"
            tensors |= {
                f"{name}.lora_down.weight": down,
                f"{name}.lora_up.weight": up,
                f"{name}.alpha": torch.tensor(float(rank)),
            }
        else:
            tensors |= {
                f"{prefix}.{path}.lora_A.weight": down,
                f"{prefix}.{path}.lora_B.weight": up,
            }
    return save(tensors)
