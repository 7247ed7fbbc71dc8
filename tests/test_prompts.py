"""Prompt logic: SDXL negative prompts, enhancer system prompts, cleaning enhancer output."""

from __future__ import annotations

import random
import string
import subprocess
import sys

import pytest

from ourvidz_serve.pipelines.base import EnhanceTarget
from ourvidz_serve.prompts import (
    ENHANCER_SYSTEM_PROMPTS,
    MAX_PROMPT_CHARS,
    check_enhanced_prompt,
    clean_enhanced_prompt,
    enhancer_messages,
    generate_negative_prompt_for_sdxl,
    is_multi_party_scene,
    prompt_stats,
)

MULTI_PARTY_TERMS = ("merged bodies", "fused bodies", "extra heads")


@pytest.mark.parametrize(
    "prompt",
    [
        "two women kissing on a balcony",
        "a man and a woman dancing a tango",
        "a couple having dinner by candlelight",
        "group of friends at a campfire",
        "3 girls in school uniforms",
        "a mother and her child in a park",
        "the crowd cheers at a concert",
    ],
)
def test_negative_prompt_for_multi_party_scenes_guards_against_merged_bodies(prompt: str) -> None:
    negative = generate_negative_prompt_for_sdxl(prompt)
    assert is_multi_party_scene(prompt)
    for term in MULTI_PARTY_TERMS:
        assert term in negative


@pytest.mark.parametrize(
    "prompt",
    [
        "a woman walking her dog on the beach",
        "portrait of an old fisherman",
        "solo girl, two swords, two moons",
        "a mountain lake at dawn",
    ],
)
def test_negative_prompt_for_single_subjects_has_no_multi_party_terms(prompt: str) -> None:
    negative = generate_negative_prompt_for_sdxl(prompt)
    assert not is_multi_party_scene(prompt)
    assert not any(term in negative for term in MULTI_PARTY_TERMS)


def test_negative_prompt_always_has_quality_and_anatomy_terms() -> None:
    for prompt in ("a mountain lake at dawn", "two men boxing", "a woman reading"):
        negative = generate_negative_prompt_for_sdxl(prompt)
        assert negative.startswith("worst quality, low quality")
        assert "bad anatomy" in negative
        assert "extra fingers" in negative


def test_single_person_prompts_are_guarded_against_duplicated_subjects() -> None:
    assert "duplicate" in generate_negative_prompt_for_sdxl("a woman reading in a cafe")
    assert "duplicate" not in generate_negative_prompt_for_sdxl("a mountain lake at dawn")


def test_negative_prompt_is_deterministic_and_fits_clip() -> None:
    prompt = "two women and a man at a party"
    assert generate_negative_prompt_for_sdxl(prompt) == generate_negative_prompt_for_sdxl(prompt)
    assert len(generate_negative_prompt_for_sdxl(prompt).split()) < 60


def test_each_enhance_target_has_its_own_system_prompt() -> None:
    sdxl = ENHANCER_SYSTEM_PROMPTS[EnhanceTarget.SDXL]
    image = ENHANCER_SYSTEM_PROMPTS[EnhanceTarget.WAN_IMAGE]
    video = ENHANCER_SYSTEM_PROMPTS[EnhanceTarget.WAN_VIDEO]
    assert len({sdxl, image, video}) == 3
    assert "comma-separated" in sdxl and "75 CLIP tokens" in sdxl
    assert "paragraph" in image and "still frame" in image
    assert "camera" in video and "motion" in video


def test_enhancer_messages_are_system_then_user() -> None:
    messages = enhancer_messages("  a cat  ", EnhanceTarget.WAN_IMAGE)
    assert messages == [
        {"role": "system", "content": ENHANCER_SYSTEM_PROMPTS[EnhanceTarget.WAN_IMAGE]},
        {"role": "user", "content": "a cat"},
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            '<|im_start|>assistant\nEnhanced prompt: "A cat, sitting on a roof"<|im_end|>',
            "A cat, sitting on a roof",
        ),
        (
            "<think>plan it first</think>**A cat** on a   roof\n\nat night",
            "A cat on a roof at night",
        ),
        (
            "Here is the enhanced prompt: a red fox in snow, soft light",
            "a red fox in snow, soft light",
        ),
        (
            "“A quiet harbour at dawn, mist over the water”</s><pad><pad>",
            "A quiet harbour at dawn, mist over the water",
        ),
        ("```\nneon city street, rain, reflections\n```", "neon city street, rain, reflections"),
    ],
)
def test_cleaning_strips_chat_markup_labels_quotes_and_whitespace(raw: str, expected: str) -> None:
    assert clean_enhanced_prompt(raw, "original") == (expected, None)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("<|im_end|>  ", "empty"),
        ("!!! ### 123 ... ???", "not letters"),
        ("cat cat cat cat cat cat cat cat cat cat", "repetition"),
        ("ok", "fewer than three words"),
        ("rpri boyiz00\ufffdiswood", "undecodable"),
    ],
)
def test_unusable_output_falls_back_to_the_original_with_a_warning(raw: str, reason: str) -> None:
    check = check_enhanced_prompt(raw, "a cat on a roof")
    assert check.used_fallback
    assert check.prompt == "a cat on a roof"
    assert check.warning is not None and reason in check.warning
    assert clean_enhanced_prompt(raw, "a cat on a roof") == (check.prompt, check.warning)


def test_long_output_is_capped_at_2000_characters_on_a_word_boundary() -> None:
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(600)]
    raw = " ".join(words)
    prompt, warning = clean_enhanced_prompt(raw, "original")
    assert len(raw) > MAX_PROMPT_CHARS >= len(prompt) > MAX_PROMPT_CHARS - 12
    assert raw.startswith(prompt) and raw[len(prompt)] == " "
    assert warning is not None and "truncated" in warning


def test_prompt_stats_counts_characters_and_words() -> None:
    assert prompt_stats("a cat  on a\troof") == {"prompt_length": 16, "prompt_word_count": 5}
    assert prompt_stats("") == {"prompt_length": 0, "prompt_word_count": 0}


def test_prompts_module_does_not_import_torch() -> None:
    code = "import sys, ourvidz_serve.prompts; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
