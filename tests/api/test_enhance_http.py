"""``POST /v1/enhance``: instant enhancement through the same enhancer the workers use."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ourvidz_serve.pipelines.base import EnhanceTarget
from tests.api.test_jobs_http import assert_error
from tests.inprocess import TinyRunners


async def test_enhance_answers_with_the_contract_shape(client) -> None:
    response = await client.post("/v1/enhance", json={"prompt": " a fox ", "target": "sdxl"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["original_prompt"] == "a fox"
    assert body["target"] == "sdxl"
    assert body["model"] == "qwen2-tiny-random"
    assert body["generation_time"] > 0
    assert body["enhanced_prompt"].strip()
    assert len(body["enhanced_prompt"]) <= 2000
    # The tiny model writes noise, so it either passed the cleaning or fell back, visibly.
    if body["fallback"]:
        assert body["enhanced_prompt"] == "a fox"
        assert body["warning"]


async def test_concurrent_requests_for_every_target_each_get_their_own_answer(client) -> None:
    prompts = {target: f"a lighthouse for {target.value}" for target in EnhanceTarget}
    responses = await asyncio.gather(
        *(
            client.post("/v1/enhance", json={"prompt": prompt, "target": target.value})
            for target, prompt in prompts.items()
        )
    )
    for (target, prompt), response in zip(prompts.items(), responses, strict=True):
        assert response.status_code == 200, response.text
        assert (response.json()["original_prompt"], response.json()["target"]) == (
            prompt,
            target.value,
        )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "", "target": "sdxl"}, "prompt"),
        ({"prompt": "   ", "target": "sdxl"}, "empty"),
        ({"prompt": "x" * 2001, "target": "sdxl"}, "at most 2000"),
        ({"prompt": "a cat", "target": "midjourney"}, "target"),
        ({"prompt": "a cat"}, "target: Field required"),
        ({"prompt": "a cat", "target": "sdxl", "temperature": 2}, "Extra inputs"),
        ({"prompt": 5, "target": "sdxl"}, "prompt"),
    ],
)
async def test_a_bad_enhance_request_gets_422(client, body, fragment) -> None:
    assert_error(await client.post("/v1/enhance", json=body), 422, "invalid_request", fragment)


async def test_enhance_needs_a_credential(client) -> None:
    response = await client.post(
        "/v1/enhance", json={"prompt": "a cat", "target": "sdxl"}, headers={"Authorization": ""}
    )
    assert_error(response, 401, "unauthorized")


async def test_a_refused_prompt_is_refused_before_the_enhancer_sees_it(client) -> None:
    response = await client.post(
        "/v1/enhance", json={"prompt": "nude photo of a 12 year old girl", "target": "sdxl"}
    )
    assert_error(response, 422, "prompt_refused", "content policy")
    assert "nude" not in response.json()["error"]["message"]


async def test_a_failing_generate_call_falls_back_to_the_original_prompt(
    client, tiny_runners: TinyRunners
) -> None:
    def out_of_memory(module: torch.nn.Module, args: object) -> None:
        raise RuntimeError("injected: the enhancer's forward failed")

    hook = tiny_runners.enhancer.model.register_forward_pre_hook(out_of_memory)
    try:
        response = await client.post(
            "/v1/enhance", json={"prompt": "a red fox in snow", "target": "wan_video"}
        )
    finally:
        hook.remove()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] is True
    assert body["enhanced_prompt"] == body["original_prompt"] == "a red fox in snow"
    assert "injected: the enhancer's forward failed" in body["warning"]
    # And the enhancer works again afterwards.
    again = await client.post("/v1/enhance", json={"prompt": "a red fox", "target": "sdxl"})
    assert again.status_code == 200
    assert "injected" not in (again.json()["warning"] or "")
