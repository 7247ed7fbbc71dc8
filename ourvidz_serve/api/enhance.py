"""``POST /v1/enhance``: instant prompt enhancement, batched with the workers' requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS, error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.jobs.enhancement import Enhancement
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.pipelines.base import EnhanceTarget
from ourvidz_serve.prompts import MAX_PROMPT_CHARS

router = APIRouter(prefix="/v1/enhance", tags=["enhance"])


class EnhanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    target: EnhanceTarget = Field(description="The model the prompt is written for")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        stripped = value.strip()
        if not stripped:
            raise ValueError("the prompt is empty")
        return stripped


@router.post(
    "",
    response_model=Enhancement,
    responses={**AUTHENTICATED_ERRORS, **error_responses(400, 413, 422, 503)},
)
async def enhance_prompt(
    body: EnhanceBody,
    state: Annotated[AppState, Depends(get_state)],
    _principal: Annotated[Principal, Depends(require_principal)],
) -> Enhancement:
    """Rewrite a prompt for ``target`` with the Qwen enhancer (per-target system prompt).

    The prompt passes the prompt policy first (422 ``prompt_refused``); the enhanced text
    passes it too, or the original prompt is returned with ``fallback``.
    """
    return await state.enhancement.enhance(body.prompt, body.target)
