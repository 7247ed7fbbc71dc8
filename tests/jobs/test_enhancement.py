"""The enhancement service: prompt policy on both sides, and fallbacks that say why."""

from __future__ import annotations

import pytest

from ourvidz_serve.errors import InvalidRequest, PromptRefused
from ourvidz_serve.jobs.enhancement import EnhancementService
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult, EnhanceTarget
from ourvidz_serve.security.prompt_policy import PromptPolicy


class ScriptedEnhancer:
    """An enhancer that answers with a fixed text, or raises (stands in for the deployment)."""

    def __init__(self, answer: str | Exception) -> None:
        self.answer = answer
        self.seen: list[EnhanceRequest] = []

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        self.seen.extend(requests)
        if isinstance(self.answer, Exception):
            raise self.answer
        return [EnhanceResult(self.answer, used_fallback=False, model="scripted")]


POLICY = PromptPolicy(minors_rule=True, deny_patterns=[r"\bforbidden\b"], classifier=None)


async def test_the_model_text_is_returned_when_it_passes_the_policy() -> None:
    enhancer = ScriptedEnhancer("a red fox in fresh snow, golden light")
    result = await EnhancementService(enhancer, POLICY).enhance("a fox", EnhanceTarget.SDXL)
    assert (result.enhanced_prompt, result.fallback, result.model) == (
        "a red fox in fresh snow, golden light",
        False,
        "scripted",
    )
    assert enhancer.seen == [EnhanceRequest("a fox", EnhanceTarget.SDXL)]


async def test_model_text_the_policy_refuses_falls_back_to_the_original() -> None:
    enhancer = ScriptedEnhancer("a fox in a forbidden place")
    result = await EnhancementService(enhancer, POLICY).enhance("a fox", EnhanceTarget.WAN_IMAGE)
    assert (result.enhanced_prompt, result.fallback) == ("a fox", True)
    assert "enhanced prompt was refused" in (result.warning or "")


async def test_an_unreachable_enhancer_falls_back_with_a_warning() -> None:
    enhancer = ScriptedEnhancer(ConnectionError("replica died"))
    result = await EnhancementService(enhancer, POLICY).enhance("a fox", EnhanceTarget.WAN_VIDEO)
    assert (result.enhanced_prompt, result.fallback, result.model) == ("a fox", True, None)
    assert "replica died" in (result.warning or "")


async def test_the_enhancers_typed_errors_are_not_hidden_as_fallbacks() -> None:
    enhancer = ScriptedEnhancer(InvalidRequest("request 0: the prompt is empty"))
    with pytest.raises(InvalidRequest):
        await EnhancementService(enhancer, POLICY).enhance("a fox", EnhanceTarget.SDXL)


async def test_a_refused_prompt_never_reaches_the_enhancer() -> None:
    enhancer = ScriptedEnhancer("unused")
    with pytest.raises(PromptRefused):
        await EnhancementService(enhancer, POLICY).enhance("forbidden fox", EnhanceTarget.SDXL)
    assert enhancer.seen == []
