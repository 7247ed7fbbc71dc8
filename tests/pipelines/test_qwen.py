"""Qwen prompt enhancer on the tiny profile: a real Qwen2ForCausalLM with random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ourvidz_serve.errors import InvalidRequest, ModelLoadError
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceTarget
from ourvidz_serve.pipelines.qwen import (
    QWEN25_7B_CONFIG,
    QwenEnhancerRunner,
    build_random_qwen,
)
from ourvidz_serve.pipelines.tokenizers import qwen_tokenizer
from ourvidz_serve.prompts import ENHANCER_SYSTEM_PROMPTS, enhancer_messages
from ourvidz_serve.settings import ModelProfile, Settings

REQUESTS = [
    EnhanceRequest("a cat on a tin roof", EnhanceTarget.SDXL),
    EnhanceRequest("two friends laughing in a diner at night", EnhanceTarget.WAN_IMAGE),
    EnhanceRequest("waves crashing on black rocks", EnhanceTarget.WAN_VIDEO),
]


@pytest.fixture(scope="module")
def runner() -> QwenEnhancerRunner:
    return QwenEnhancerRunner.build(Settings(device="cpu"))


def test_batch_of_three_returns_three_results_in_order(runner: QwenEnhancerRunner) -> None:
    results = runner.enhance(REQUESTS)
    assert len(results) == 3
    for request, result in zip(REQUESTS, results, strict=True):
        assert result.enhanced_prompt.strip()
        assert len(result.enhanced_prompt) <= 2000
        if result.used_fallback:
            assert result.enhanced_prompt == request.prompt


def test_garbage_output_of_random_weights_falls_back_to_the_original_with_a_warning(
    runner: QwenEnhancerRunner,
) -> None:
    results = runner.enhance(REQUESTS, max_new_tokens=24)
    for request, result in zip(REQUESTS, results, strict=True):
        assert result.used_fallback
        assert result.enhanced_prompt == request.prompt
        assert result.warning and "original prompt" in result.warning


def test_greedy_decoding_is_deterministic(runner: QwenEnhancerRunner) -> None:
    texts = [
        runner.tokenizer.apply_chat_template(
            enhancer_messages(r.prompt, r.target), tokenize=False, add_generation_prompt=True
        )
        for r in REQUESTS
    ]
    batch = runner.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    first = runner.model.generate(**batch, max_new_tokens=8, do_sample=False)
    second = runner.model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)
    assert runner.enhance(REQUESTS) == runner.enhance(REQUESTS)


def test_empty_batch_returns_nothing(runner: QwenEnhancerRunner) -> None:
    assert runner.enhance([]) == []


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 2001])
def test_invalid_prompts_are_rejected(runner: QwenEnhancerRunner, prompt: str) -> None:
    with pytest.raises(InvalidRequest):
        runner.enhance([REQUESTS[0], EnhanceRequest(prompt, EnhanceTarget.SDXL)])


def test_chat_template_is_chatml_with_the_targets_system_prompt() -> None:
    tokenizer = qwen_tokenizer()
    text = tokenizer.apply_chat_template(
        enhancer_messages("a cat", EnhanceTarget.WAN_VIDEO),
        tokenize=False,
        add_generation_prompt=True,
    )
    system = ENHANCER_SYSTEM_PROMPTS[EnhanceTarget.WAN_VIDEO]
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer.all_special_ids


def test_batched_prompts_are_left_padded(runner: QwenEnhancerRunner) -> None:
    batch = runner.tokenizer(
        ["short", "a much longer prompt than the first"], return_tensors="pt", padding=True
    )
    assert runner.tokenizer.padding_side == "left"
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1
    assert batch.input_ids[0, 0] == runner.tokenizer.pad_token_id


def test_weights_profile_without_model_dir_raises_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="OURVIDZ_QWEN_MODEL_DIR"):
        QwenEnhancerRunner.build(Settings(device="cpu", model_profile=ModelProfile.WEIGHTS))


def test_weights_profile_with_missing_model_dir_raises_model_load_error(tmp_path: Path) -> None:
    settings = Settings(
        device="cpu", model_profile=ModelProfile.WEIGHTS, qwen_model_dir=tmp_path / "missing"
    )
    with pytest.raises(ModelLoadError, match="does not exist"):
        QwenEnhancerRunner.build(settings)


def test_weights_profile_loads_a_local_model_folder(
    runner: QwenEnhancerRunner, tmp_path: Path
) -> None:
    folder = tmp_path / "Qwen2.5-tiny"
    runner.model.save_pretrained(folder)
    runner.tokenizer.save_pretrained(folder)
    settings = Settings(device="cpu", model_profile=ModelProfile.WEIGHTS, qwen_model_dir=folder)
    loaded = QwenEnhancerRunner.build(settings)

    assert loaded.model_name == "Qwen2.5-tiny"
    assert loaded.tokenizer.padding_side == "left"

    def texts(results: list) -> list[tuple[str, bool]]:
        return [(r.enhanced_prompt, r.used_fallback) for r in results]

    assert texts(loaded.enhance(REQUESTS, max_new_tokens=8)) == texts(
        runner.enhance(REQUESTS, max_new_tokens=8)
    )


def test_full_random_config_is_qwen25_7b_instruct() -> None:
    model, _ = build_random_qwen(QWEN25_7B_CONFIG, torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512
    assert model.config.num_key_value_heads == 4
    assert model.config.vocab_size == 152_064
    assert not model.config.tie_word_embeddings
    assert model.dtype == torch.bfloat16


def test_a_failed_generate_returns_every_original_prompt_with_the_reason(
    runner: QwenEnhancerRunner,
) -> None:
    def fail(module: torch.nn.Module, args: object) -> None:
        raise RuntimeError("injected forward failure")

    hook = runner.model.register_forward_pre_hook(fail)
    try:
        results = runner.enhance_or_fallback(REQUESTS)
    finally:
        hook.remove()
    assert [r.enhanced_prompt for r in results] == [r.prompt for r in REQUESTS]
    assert all(r.used_fallback and "injected forward failure" in (r.warning or "") for r in results)
    assert all(r.model == "qwen2-tiny-random" for r in results)


def test_results_name_the_model_that_answered(runner: QwenEnhancerRunner) -> None:
    assert {r.model for r in runner.enhance_or_fallback(REQUESTS)} == {"qwen2-tiny-random"}
