"""What the SDXL runner tests share: a request with the defaults they vary from."""

from __future__ import annotations

from typing import Any

from ourvidz_serve.pipelines.base import ImageRequest


def image_request(
    seed: int, prompt: str, *, steps: int, negative_prompt: str | None = "blurry", **changes: Any
) -> ImageRequest:
    """A 1024² request at guidance 6.0 (the tiny profile draws it at its native size)."""
    fields: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": 6.0,
        "width": 1024,
        "height": 1024,
    }
    return ImageRequest(**(fields | changes))
