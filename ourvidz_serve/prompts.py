"""Prompt logic shared by the pipelines and the API: negative prompts, enhancer prompts, cleaning.

Pure Python (no torch), so the ingress can use it without loading any model library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PROMPT_CHARS = 2000
"""Longest prompt the service accepts, and the cap on an enhanced prompt."""

# --- SDXL negative prompts -------------------------------------------------------------------

# Ordered by importance: CLIP keeps only the first 77 tokens of a negative prompt.
_QUALITY_TERMS = (
    "worst quality",
    "low quality",
    "lowres",
    "blurry",
    "jpeg artifacts",
    "watermark",
    "signature",
    "text",
)
_ANATOMY_TERMS = (
    "bad anatomy",
    "deformed",
    "extra limbs",
    "extra fingers",
    "fused fingers",
    "bad hands",
    "poorly drawn face",
)
_SINGLE_SUBJECT_TERMS = ("duplicate", "clone", "extra person")
_MULTI_PARTY_TERMS = (
    "merged bodies",
    "fused bodies",
    "conjoined",
    "extra heads",
    "floating limbs",
    "disconnected limbs",
    "wrong number of people",
)

_PERSON_SINGULAR = (
    r"man|woman|girl|boy|guy|lady|gentleman|person|child|kid|teen|teenager|model|"
    r"actress|actor|dancer|soldier|warrior|knight|wife|husband|girlfriend|boyfriend|"
    r"mother|father|mom|dad|bride|groom|nurse|teacher|student|queen|king|princess|prince|"
    r"elf|witch|wizard|character|figure|portrait|selfie"
)
_PERSON_PLURAL = (
    r"men|women|girls|boys|guys|ladies|gentlemen|people|persons|children|kids|teens|"
    r"teenagers|models|actresses|actors|dancers|soldiers|warriors|knights|friends|"
    r"sisters|brothers|twins|triplets|lovers|partners|players|students|nurses|elves|witches"
)
_GROUP_WORDS = (
    r"couple|group|crowd|family|team|band|trio|threesome|foursome|gang|audience|"
    r"together|duo|pair|orgy"
)
_COUNT_WORDS = r"two|three|four|five|six|seven|eight|nine|ten|several|many|multiple|both|\d+"

_SINGULAR_RE = re.compile(rf"\b(?:{_PERSON_SINGULAR})\b", re.IGNORECASE)
_PLURAL_RE = re.compile(rf"\b(?:{_PERSON_PLURAL})\b", re.IGNORECASE)
_GROUP_RE = re.compile(rf"\b(?:{_GROUP_WORDS})\b", re.IGNORECASE)
_COUNTED_RE = re.compile(
    rf"\b(?:{_COUNT_WORDS})\s+(?:[a-z-]+\s+){{0,2}}(?:{_PERSON_PLURAL})\b", re.IGNORECASE
)
_SOLO_RE = re.compile(r"\b(?:solo|alone|single person|1girl|1boy)\b", re.IGNORECASE)


def is_multi_party_scene(prompt: str) -> bool:
    """True when the prompt describes two or more people.

    Detected by: a plural person noun ("women", "friends"), a counted group ("two men"),
    a group word ("couple", "crowd", "together"), or two or more singular person nouns
    ("a man and a woman"). Explicit "solo"/"alone" wins.
    """
    if _SOLO_RE.search(prompt):
        return False
    if _PLURAL_RE.search(prompt) or _COUNTED_RE.search(prompt) or _GROUP_RE.search(prompt):
        return True
    return len(_SINGULAR_RE.findall(prompt)) >= 2


def mentions_person(prompt: str) -> bool:
    return bool(_SINGULAR_RE.search(prompt) or _PLURAL_RE.search(prompt) or _SOLO_RE.search(prompt))


def generate_negative_prompt_for_sdxl(prompt: str) -> str:
    """The seed platform's SDXL negative prompt, with multi-party scene detection.

    Always: quality terms, then anatomy terms. Multi-party scenes add terms against merged,
    fused and extra bodies; single-person scenes add terms against duplicated subjects.
    Deterministic: the same prompt always gives the same negative prompt.
    """
    terms = [*_QUALITY_TERMS, *_ANATOMY_TERMS]
    if is_multi_party_scene(prompt):
        terms.extend(_MULTI_PARTY_TERMS)
    elif mentions_person(prompt):
        terms.extend(_SINGLE_SUBJECT_TERMS)
    return ", ".join(terms)


# --- Enhancer system prompts -----------------------------------------------------------------

_COMMON_RULES = (
    "Keep every subject, action and detail the user asked for; add, never remove. "
    "Write in English. Reply with the rewritten prompt only: no preamble, no explanation, "
    "no quotes, no markdown, no lists."
)

# Keyed by ``EnhanceTarget`` values (a StrEnum, so its members look up these keys directly).
ENHANCER_SYSTEM_PROMPTS: dict[str, str] = {
    "sdxl": (
        "You rewrite prompts for the Stable Diffusion XL image model. Turn the user's idea "
        "into one line of comma-separated tags and short phrases, most important first: "
        "subject, appearance, clothing, pose and expression, setting, lighting, camera and "
        "lens, art style, then quality tags such as 'highly detailed, sharp focus'. "
        "Stay under 60 words so it fits in 75 CLIP tokens. " + _COMMON_RULES
    ),
    "wan_image": (
        "You rewrite prompts for the Wan 2.1 image model. Turn the user's idea into one rich, "
        "flowing descriptive paragraph of 80 to 150 words describing a single still frame: "
        "the subject and its appearance, the setting, composition and framing, lighting, "
        "colour palette, textures and the photographic or artistic style. " + _COMMON_RULES
    ),
    "wan_video": (
        "You rewrite prompts for the Wan 2.1 video model, which makes 5-second clips. Turn the "
        "user's idea into one rich descriptive paragraph of 100 to 180 words: the subject and "
        "setting, then what moves and how (actions, their order and pace over the clip), the "
        "camera (shot size, angle, movement such as a slow dolly-in or a tracking shot), "
        "lighting and atmosphere, and the visual style. Describe continuous, physically "
        "plausible motion from start to end of the clip. " + _COMMON_RULES
    ),
}


def enhancer_messages(prompt: str, target: str) -> list[dict[str, str]]:
    """Chat messages for one enhancement: the target's system prompt and the user's prompt."""
    return [
        {"role": "system", "content": ENHANCER_SYSTEM_PROMPTS[target]},
        {"role": "user", "content": prompt.strip()},
    ]


# --- Cleaning the enhancer's output ----------------------------------------------------------

_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_CHAT_TOKEN_RE = re.compile(r"<\|[^|>]{0,40}\|>|</?s>|<pad>|<unk>|\[/?INST\]", re.IGNORECASE)
_ROLE_LINE_RE = re.compile(r"^\s*(?:system|user|assistant)\s*:?\s*\n", re.IGNORECASE)
_LABEL_RE = re.compile(
    r"^\s*(?:here(?:'s| is)[^:\n]{0,60}:"
    r"|(?:enhanced|improved|rewritten|final|new)?\s*prompt\s*:)\s*",
    re.IGNORECASE,
)
_MARKDOWN_RE = re.compile(r"```[a-z]*|\*\*|__|^#+\s*", re.MULTILINE)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_WORD_RE = re.compile(r"[^\W\d_]{2,}")


@dataclass(frozen=True)
class EnhancedPromptCheck:
    """The prompt to use, whether it is the original (fallback), and why, if anything."""

    prompt: str
    used_fallback: bool
    warning: str | None


def _strip_markup(text: str) -> str:
    text = _THINK_RE.sub(" ", text)
    text = _CHAT_TOKEN_RE.sub(" ", text)
    text = _ROLE_LINE_RE.sub("", text)
    text = _MARKDOWN_RE.sub("", text)
    text = _LABEL_RE.sub("", text)
    text = " ".join(text.split())
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text.strip(_QUOTES + " ")


def _unusable_reason(text: str) -> str | None:
    if not text:
        return "empty output"
    if "\ufffd" in text:
        return "output contains undecodable bytes"
    non_space = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in non_space)
    if letters < 0.6 * len(non_space):
        return "output is mostly not letters"
    words = _WORD_RE.findall(text.lower())
    if len(words) < 3:
        return "output has fewer than three words"
    if len(words) >= 8 and len(set(words)) < 0.3 * len(words):
        return "output is degenerate repetition"
    return None


def _cap_length(text: str, limit: int = MAX_PROMPT_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut[:limit].rstrip(" ,;:-")


def check_enhanced_prompt(text: str, original: str) -> EnhancedPromptCheck:
    """Clean the enhancer's raw output; fall back to ``original`` when it is unusable."""
    cleaned = _strip_markup(text)
    reason = _unusable_reason(cleaned)
    if reason is not None:
        return EnhancedPromptCheck(
            prompt=original,
            used_fallback=True,
            warning=f"prompt enhancement unusable ({reason}); the original prompt was used",
        )
    capped = _cap_length(cleaned)
    warning = None
    if len(capped) < len(cleaned):
        warning = f"enhanced prompt truncated to {MAX_PROMPT_CHARS} characters"
    return EnhancedPromptCheck(prompt=capped, used_fallback=False, warning=warning)


def clean_enhanced_prompt(text: str, original: str) -> tuple[str, str | None]:
    """(prompt to use, warning or None): markup stripped, length capped, original on failure."""
    check = check_enhanced_prompt(text, original)
    return check.prompt, check.warning


def prompt_stats(prompt: str) -> dict[str, int]:
    """The seed's ``prompt_length`` (characters) and ``prompt_word_count`` metadata."""
    return {"prompt_length": len(prompt), "prompt_word_count": len(prompt.split())}
