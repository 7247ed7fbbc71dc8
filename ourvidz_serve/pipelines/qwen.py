"""Prompt enhancement with a Qwen2.5 instruct model (transformers ``Qwen2ForCausalLM``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from ourvidz_serve.errors import InvalidRequest, ModelLoadError
from ourvidz_serve.pipelines.base import (
    EnhanceRequest,
    EnhanceResult,
    EnhanceTarget,
)
from ourvidz_serve.pipelines.devices import random_init, resolve_device
from ourvidz_serve.pipelines.tokenizers import qwen_tokenizer
from ourvidz_serve.prompts import MAX_PROMPT_CHARS, check_enhanced_prompt, enhancer_messages
from ourvidz_serve.settings import ModelProfile, Settings

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
"""Room for a WAN video paragraph (up to ~180 words)."""
TINY_MAX_NEW_TOKENS = 12
REPETITION_PENALTY = 1.05
"""Qwen2.5-Instruct's own generation setting; deterministic under greedy decoding."""

# Qwen/Qwen2.5-7B-Instruct, written out so no download is needed.
QWEN25_7B_CONFIG: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
}
TINY_QWEN_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": False,
}


def build_random_qwen(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[Qwen2ForCausalLM, Any]:
    """A Qwen2 causal LM with random weights created on ``device``, and the code tokenizer."""
    tokenizer = qwen_tokenizer()
    qwen_config = Qwen2Config(
        **{**config, "vocab_size": max(config.get("vocab_size", 0), len(tokenizer))},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with random_init(device, dtype, seed):
        model = Qwen2ForCausalLM(qwen_config)
    return model.eval(), tokenizer


def load_qwen(
    path: Path | None, device: torch.device, dtype: torch.dtype
) -> tuple[Qwen2ForCausalLM, Any]:
    """Real weights from a local Hugging Face folder (e.g. Qwen2.5-7B-Instruct), offline."""
    if path is None:
        raise ModelLoadError(
            "OURVIDZ_QWEN_MODEL_DIR is not set: the weights profile needs a local "
            "Qwen2.5 instruct model folder"
        )
    if not path.is_dir():
        raise ModelLoadError(f"Qwen model directory {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = Qwen2ForCausalLM.from_pretrained(
            str(path), dtype=dtype, device_map=str(device), local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load Qwen weights from {path}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"the tokenizer in {path} has no chat template")
    return model.eval(), tokenizer


class QwenEnhancerRunner:
    """Batched, greedy prompt enhancement; unusable output falls back to the original prompt.

    ``model`` must already be on ``device``.
    """

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        tokenizer: Any,
        *,
        profile: ModelProfile,
        device: torch.device,
        model_name: str,
    ) -> None:
        self.profile = profile
        self.device = device
        self.model_name = model_name
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.default_max_new_tokens = (
            TINY_MAX_NEW_TOKENS if profile is ModelProfile.TINY else DEFAULT_MAX_NEW_TOKENS
        )
        self._stop_ids = self._stop_token_ids()
        self.acceleration: dict[str, Any] = {
            "device": str(device),
            "dtype": str(model.dtype).removeprefix("torch."),
            # transformers' choice: SDPA where the model supports it, else eager.
            "attention_backend": model.config._attn_implementation,
            "batch_max_new_tokens": self.default_max_new_tokens,
        }
        self._lock = threading.Lock()

    @classmethod
    def build(cls, settings: Settings) -> QwenEnhancerRunner:
        device = resolve_device(settings.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        profile = settings.model_profile
        if profile is ModelProfile.TINY:
            model, tokenizer = build_random_qwen(TINY_QWEN_CONFIG, device, dtype)
            name = "qwen2-tiny-random"
        elif profile is ModelProfile.FULL_RANDOM:
            model, tokenizer = build_random_qwen(QWEN25_7B_CONFIG, device, dtype)
            name = "qwen2.5-7b-instruct-random"
        else:
            model, tokenizer = load_qwen(settings.qwen_model_dir, device, dtype)
            name = Path(str(settings.qwen_model_dir)).name
        return cls(model, tokenizer, profile=profile, device=device, model_name=name)

    def _stop_token_ids(self) -> list[int]:
        """``<|im_end|>`` ends an assistant turn; ``<|endoftext|>`` ends the text."""
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return sorted(i for i in ids if i is not None)

    @staticmethod
    def validate(requests: Sequence[EnhanceRequest]) -> None:
        for index, request in enumerate(requests):
            if not isinstance(request.prompt, str) or not request.prompt.strip():
                raise InvalidRequest(f"request {index}: the prompt is empty")
            if len(request.prompt) > MAX_PROMPT_CHARS:
                raise InvalidRequest(
                    f"request {index}: the prompt is longer than {MAX_PROMPT_CHARS} characters"
                )
            if request.target not in set(EnhanceTarget):
                raise InvalidRequest(f"request {index}: unknown target {request.target!r}")

    def enhance(
        self, requests: Sequence[EnhanceRequest], max_new_tokens: int | None = None
    ) -> list[EnhanceResult]:
        """One batched, greedy ``generate`` call for all requests; results in request order."""
        self.validate(requests)
        if not requests:
            return []
        limit = max_new_tokens or self.default_max_new_tokens
        texts = [
            self.tokenizer.apply_chat_template(
                enhancer_messages(r.prompt, r.target), tokenize=False, add_generation_prompt=True
            )
            for r in requests
        ]
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        config = GenerationConfig(
            max_new_tokens=limit,
            do_sample=False,
            repetition_penalty=REPETITION_PENALTY,
            eos_token_id=self._stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with self._lock, torch.inference_mode():
            output = self.model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()
        results = []
        for request, tokens in zip(requests, new_tokens, strict=True):
            finished = bool(torch.isin(tokens, torch.tensor(self._stop_ids)).any())
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            check = check_enhanced_prompt(text, request.prompt)
            warning = check.warning
            if not finished and not check.used_fallback:
                cut = f"enhancement stopped at max_new_tokens={limit} and may be cut short"
                warning = f"{warning}; {cut}" if warning else cut
            results.append(
                EnhanceResult(check.prompt, check.used_fallback, warning, self.model_name)
            )
        return results

    def enhance_or_fallback(
        self, requests: Sequence[EnhanceRequest], max_new_tokens: int | None = None
    ) -> list[EnhanceResult]:
        """``enhance``, but a failed ``generate`` returns each original prompt with a warning.

        For a batch of already validated requests (the deployment validates each caller's
        before it joins a batch): one caller's trouble must not fail its batch-mates' jobs,
        and an enhancement is never worth failing a generation for.
        """
        try:
            return self.enhance(requests, max_new_tokens)
        except Exception as exc:
            logger.exception(
                "enhancement of %d prompts failed; returning them unchanged", len(requests)
            )
            warning = f"enhancement failed ({type(exc).__name__}: {exc}); original prompt used"
            return [
                EnhanceResult(
                    r.prompt, used_fallback=True, warning=warning[:500], model=self.model_name
                )
                for r in requests
            ]
