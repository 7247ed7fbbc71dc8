"""Tokenizers built in code for the ``tiny`` and ``full-random`` profiles (nothing is downloaded).

Each is a byte-level BPE trained on a fixed English corpus, so any text encodes (byte
fallback) and token counts are in the range of the real tokenizers. The trained tokenizers
ship as small JSON files beside this module (``tokenizer_files/``), so a replica loads them
instead of training at start-up; ``python -m ourvidz_serve.pipelines.tokenizers`` rewrites
them after a change to the corpus, and a test checks that they equal a fresh training.
They are wrapped as ``PreTrainedTokenizerFast`` with the special tokens and call
conventions of the tokenizer each pipeline expects:

- :func:`clip_tokenizer`: CLIP (SDXL): lower-cased, ``<|startoftext|> ... <|endoftext|>``,
  ``model_max_length`` 77, padded with ``<|endoftext|>``.
- :func:`t5_tokenizer`: UMT5 (WAN): ``... </s>``, padded with ``<pad>`` (id 0) to up to 512.
- :func:`qwen_tokenizer`: Qwen2.5: ChatML chat template, ``<|im_end|>`` as eos, left padding.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from ourvidz_serve.prompts import ENHANCER_SYSTEM_PROMPTS, generate_negative_prompt_for_sdxl

BPE_VOCAB_SIZE = 2048

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5's ChatML layout (its default system message is left out: callers always send one)."""

_PROMPT_TEXT = """
a an the and with in on at of under over behind beside near through across into from by
portrait photo photograph cinematic film still close-up wide shot full body half body
woman man girl boy person people couple group friends family child old young elderly
beautiful handsome smiling laughing serious happy sad calm angry surprised looking
standing sitting walking running dancing lying jumping holding wearing reaching turning
long short curly straight blonde brown black red silver hair eyes face skin hands lips
dress shirt jacket coat suit jeans skirt hat glasses boots leather silk cotton lace armor
city street forest beach mountain lake river ocean sea desert field garden park room
kitchen bedroom cafe restaurant bar office studio library castle temple bridge village
night day sunset sunrise morning evening rain snow fog storm clouds sky stars moon sun
light lighting soft hard warm cold golden hour neon backlight rim natural dramatic moody
colour color blue green yellow orange purple pink white grey gray gold vibrant pastel
camera lens 35mm 50mm 85mm bokeh depth field shallow focus sharp detailed highly ultra
realistic photorealistic hyperrealistic painting illustration anime digital art style
texture fabric wood metal stone glass water fire smoke reflections shadows highlights
motion moving slowly quickly gently camera pans tilts zooms dolly tracking shot orbit
slow motion time lapse scene background foreground composition framing centered
cat dog horse bird car train boat house tree flowers grass leaves snowflakes waves
masterpiece best quality high resolution 4k 8k award winning trending professional
"""


def _corpus() -> list[str]:
    lines = _PROMPT_TEXT.strip().splitlines()
    lines.extend(ENHANCER_SYSTEM_PROMPTS.values())
    lines.append(generate_negative_prompt_for_sdxl("two women and a man"))
    return lines * 2


def _train(
    special_tokens: list[str], normalizer: normalizers.Normalizer | None, lowercase_corpus: bool
) -> str:
    tokenizer = Tokenizer(models.BPE())
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line.lower() for line in _corpus()] if lowercase_corpus else _corpus()
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str()


TOKENIZER_KINDS = ("clip", "t5", "qwen")
TOKENIZER_FILES = Path(__file__).with_name("tokenizer_files")


def train_tokenizer(kind: str) -> str:
    """Train one kind's backend tokenizer from the corpus; its serialized JSON."""
    if kind == "clip":
        norm = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        return _train([CLIP_BOS, CLIP_EOS], norm, lowercase_corpus=True)
    if kind == "t5":
        return _train([T5_PAD, T5_EOS, T5_UNK], normalizers.NFKC(), lowercase_corpus=False)
    if kind == "qwen":
        specials = [QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END]
        return _train(specials, normalizers.NFC(), lowercase_corpus=False)
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def write_tokenizer_files(directory: Path = TOKENIZER_FILES) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in TOKENIZER_KINDS:
        path = directory / f"{kind}.json"
        path.write_text(train_tokenizer(kind))
        paths.append(path)
    return paths


@cache
def _shipped(kind: str) -> str:
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return (TOKENIZER_FILES / f"{kind}.json").read_text()


def _backend(kind: str) -> Tokenizer:
    return Tokenizer.from_str(_shipped(kind))


def clip_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """A CLIP-style tokenizer for the SDXL text encoders."""
    backend = _backend("clip")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        pair=f"{CLIP_BOS} $A {CLIP_EOS} $B {CLIP_EOS}",
        special_tokens=[(t, backend.token_to_id(t)) for t in (CLIP_BOS, CLIP_EOS)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=model_max_length,
        padding_side="right",
    )


def t5_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer for WAN's UMT5 text encoder (``</s>`` appended, ``<pad>`` = 0)."""
    backend = _backend("t5")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}",
        pair=f"$A {T5_EOS} $B {T5_EOS}",
        special_tokens=[(T5_EOS, backend.token_to_id(T5_EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=T5_EOS,
        pad_token=T5_PAD,
        unk_token=T5_UNK,
        model_max_length=model_max_length,
        padding_side="right",
    )


def qwen_tokenizer(model_max_length: int = 32768) -> PreTrainedTokenizerFast:
    """A Qwen2.5-style chat tokenizer: ChatML template, ``<|im_end|>`` eos, left padding."""
    backend = _backend("qwen")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=QWEN_IM_END,
        pad_token=QWEN_ENDOFTEXT,
        additional_special_tokens=[QWEN_IM_START, QWEN_IM_END],
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
    )


if __name__ == "__main__":
    for written in write_tokenizer_files():
        print(f"wrote {written} ({written.stat().st_size} bytes)")
