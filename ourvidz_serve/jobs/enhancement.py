"""Instant prompt enhancement (``POST /v1/enhance``): the frontend's "enhance" button.

The request goes to the same Enhancer deployment, and into the same batches, as the WAN
workers' enhanced job types. The user's prompt passes the prompt policy before any model
time; the model's text passes it too, or the original prompt comes back instead.
"""

from __future__ import annotations

import logging
import time

from pydantic import BaseModel

from ourvidz_serve.errors import OurVidzError, PromptRefused
from ourvidz_serve.pipelines.base import Enhancer, EnhanceRequest, EnhanceResult, EnhanceTarget
from ourvidz_serve.security.prompt_policy import PromptPolicy

logger = logging.getLogger(__name__)


class Enhancement(BaseModel):
    """The answer of ``POST /v1/enhance``."""

    original_prompt: str
    enhanced_prompt: str
    """Equal to ``original_prompt`` when ``fallback`` is true."""
    target: EnhanceTarget
    model: str | None
    """The enhancer model that answered; null when none could."""
    generation_time: float
    """Seconds, the enhancer's batch wait included."""
    fallback: bool
    """The enhancer failed or wrote nothing usable, so the original prompt came back."""
    warning: str | None


class EnhancementService:
    def __init__(self, enhancer: Enhancer, policy: PromptPolicy) -> None:
        self._enhancer = enhancer
        self._policy = policy

    async def enhance(self, prompt: str, target: EnhanceTarget) -> Enhancement:
        """The enhanced prompt, or the original one with ``fallback`` and a warning.

        Raises PromptRefused for a refused prompt and the enhancer's own typed errors (an
        invalid request); an enhancer that fails or cannot be reached is a fallback.
        """
        await self._policy.check(prompt, field="prompt")
        started = time.monotonic()
        try:
            [result] = await self._enhancer.enhance([EnhanceRequest(prompt, target)])
        except OurVidzError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the answer and the log
            logger.warning("instant enhancement failed (%r); returning the original prompt", exc)
            result = EnhanceResult(
                prompt, used_fallback=True, warning=f"enhancer unavailable: {exc!r}"[:500]
            )
        elapsed = time.monotonic() - started
        if not result.used_fallback:
            result = await self._policy_checked(prompt, result)
        return Enhancement(
            original_prompt=prompt,
            enhanced_prompt=result.enhanced_prompt,
            target=target,
            model=result.model,
            generation_time=round(elapsed, 4),
            fallback=result.used_fallback,
            warning=result.warning,
        )

    async def _policy_checked(self, prompt: str, result: EnhanceResult) -> EnhanceResult:
        """The result, or the original prompt when the policy refuses the model's text."""
        try:
            await self._policy.check(result.enhanced_prompt, field="enhanced_prompt")
        except PromptRefused as refused:
            return EnhanceResult(
                prompt, used_fallback=True, warning=refused.message, model=result.model
            )
        return result
