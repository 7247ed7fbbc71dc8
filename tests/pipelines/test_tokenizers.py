"""The code-built tokenizers ship as files: replicas load them instead of training them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from ourvidz_serve.pipelines import tokenizers
from ourvidz_serve.pipelines.tokenizers import (
    TOKENIZER_FILES,
    TOKENIZER_KINDS,
    clip_tokenizer,
    qwen_tokenizer,
    t5_tokenizer,
    train_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_the_shipped_file_equals_a_fresh_training_on_the_corpus(kind: str) -> None:
    shipped = (TOKENIZER_FILES / f"{kind}.json").read_text()
    assert shipped == train_tokenizer(kind), (
        f"{kind}.json is stale: run `python -m ourvidz_serve.pipelines.tokenizers`"
    )


def test_tokenizers_are_built_from_the_shipped_files_without_training(monkeypatch) -> None:
    def no_training(kind: str) -> str:
        raise AssertionError(f"the {kind} tokenizer was trained at load time")

    monkeypatch.setattr(tokenizers, "train_tokenizer", no_training)
    for build, kind in ((clip_tokenizer, "clip"), (t5_tokenizer, "t5"), (qwen_tokenizer, "qwen")):
        vocab = json.loads((TOKENIZER_FILES / f"{kind}.json").read_text())["model"]["vocab"]
        assert build().get_vocab().items() >= vocab.items()


def test_the_package_data_includes_the_tokenizer_files() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["ourvidz_serve.pipelines"]
    assert "tokenizer_files/*.json" in patterns
    assert all(
        (TOKENIZER_FILES / f"{kind}.json").stat().st_size < 64_000 for kind in TOKENIZER_KINDS
    )
