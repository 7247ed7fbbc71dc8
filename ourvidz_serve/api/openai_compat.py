"""OpenAI-compatible routes: Images, Videos and Models, thin over the job service.

Their errors are in OpenAI's shape (``api.errors`` tells these paths apart), so OpenAI's SDKs
raise ``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ... as for OpenAI.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import OPENAI_AUTHENTICATED_ERRORS, openai_error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.errors import InvalidRequest, PayloadTooLarge
from ourvidz_serve.jobs.openai_compat import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    ModelObject,
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
    VideoObject,
    edit_job,
    image_job,
    parse_request,
    video_job,
)
from ourvidz_serve.jobs.principal import Principal

router = APIRouter(prefix="/v1", tags=["openai"])

UPLOAD_PATHS = ("/v1/images/edits",)
"""Routes whose body carries an image upload (their size cap is the reference image's)."""

StateDep = Annotated[AppState, Depends(get_state)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON Schema with its ``$defs`` inlined (for a hand-written requestBody)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def _form_schema(model: type[BaseModel], file_field: str | None) -> dict[str, Any]:
    """The multipart form of ``model``: its fields as strings where a form sends them so."""
    schema = _inline_refs(model.model_json_schema())
    if file_field is not None:
        schema["properties"][file_field] = {
            "type": "string",
            "format": "binary",
            "description": "A PNG, JPEG or WebP image (checked as POST /v1/references checks)",
        }
        schema["required"] = [*schema.get("required", []), file_field]
    schema["properties"]["metadata"] = {"type": "string", "description": "A JSON object"}
    return schema


def _request_body(model: type[BaseModel], *, json_too: bool, file_field: str | None) -> dict:
    content: dict[str, Any] = {"multipart/form-data": {"schema": _form_schema(model, file_field)}}
    if json_too:
        content["application/json"] = {"schema": _inline_refs(model.model_json_schema())}
    return {"requestBody": {"required": True, "content": content}}


async def _read_fields(
    request: Request, file_field: str | None, max_file_bytes: int
) -> tuple[dict[str, Any], bytes | None]:
    """A JSON or multipart body as fields, and the bytes of its one file field (if any)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise InvalidRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        return body, None
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidRequest("send multipart/form-data (or application/json where documented)")
    form = await request.form()
    fields: dict[str, Any] = {}
    upload: bytes | None = None
    for name in form:
        values = form.getlist(name)
        if len(values) > 1 or name.endswith("[]"):
            raise InvalidRequest(f"{name.removesuffix('[]')}: give one value", param=name)
        value = values[0]
        if isinstance(value, str):
            fields[name] = value
            continue
        assert isinstance(value, UploadFile)
        if name != file_field:
            # A file where text is expected: the field is named, the route decides.
            fields[name] = value.filename or "file"
            continue
        upload = await value.read(max_file_bytes + 1)
        if len(upload) > max_file_bytes:
            raise PayloadTooLarge(f"the image is larger than {max_file_bytes} bytes")
    if "metadata" in fields:
        try:
            fields["metadata"] = json.loads(fields["metadata"])
        except (ValueError, RecursionError):
            fields["metadata"] = None
        if not isinstance(fields["metadata"], dict):
            raise InvalidRequest("metadata must be a JSON object", param="metadata")
    return fields, upload


def _recorded(request: BaseModel) -> dict[str, Any]:
    """What the OpenAI request asked, kept in the job's metadata (prompt and metadata are
    recorded anyway)."""
    return request.model_dump(
        mode="json", exclude_none=True, exclude={"prompt", "metadata", "input_reference"}
    )


# --- Models ----------------------------------------------------------------------------------


@router.get("/models", response_model=ModelList, responses=OPENAI_AUTHENTICATED_ERRORS)
async def list_models(state: StateDep, _principal: PrincipalDep) -> ModelList:
    """The ten job types, as models."""
    return state.openai.models()


@router.get(
    "/models/{model_id}",
    response_model=ModelObject,
    responses={**OPENAI_AUTHENTICATED_ERRORS, **openai_error_responses(404)},
)
async def get_model(model_id: str, state: StateDep, _principal: PrincipalDep) -> ModelObject:
    return state.openai.model(model_id)


# --- Images ----------------------------------------------------------------------------------

_WAITING_ERRORS = {
    **OPENAI_AUTHENTICATED_ERRORS,
    **openai_error_responses(400, 403, 404, 409, 413, 500, 502, 504),
}


@router.post("/images/generations", response_model=ImagesResponse, responses=_WAITING_ERRORS)
async def generate_images(
    body: ImageGenerationRequest,
    state: StateDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse:
    """Generate images and answer them once the job completes (up to
    ``OURVIDZ_OPENAI_WAIT_S``; past it a 504 names the job, which goes on)."""
    return await state.openai.generate_images(
        image_job(body), principal, body.response_format, idempotency_key, _recorded(body)
    )


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    responses=_WAITING_ERRORS,
    openapi_extra=_request_body(ImageEditRequest, json_too=False, file_field="image"),
)
async def edit_images(
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse:
    """An SDXL reference job on the uploaded ``image`` (multipart), answered once complete."""
    fields, image = await _read_fields(request, "image", state.settings.reference_max_bytes)
    edit = parse_request(ImageEditRequest, fields)
    if image is None:
        raise InvalidRequest("image: an image file is required", param="image")
    # The upload is checked and stored by the job service after the cheap refusals.
    return await state.openai.generate_images(
        edit_job(edit),
        principal,
        edit.response_format,
        idempotency_key,
        _recorded(edit),
        reference_upload=image,
    )


# --- Videos ----------------------------------------------------------------------------------


@router.post(
    "/videos",
    response_model=VideoObject,
    responses={**OPENAI_AUTHENTICATED_ERRORS, **openai_error_responses(400, 403, 409, 413)},
    openapi_extra=_request_body(VideoCreateRequest, json_too=True, file_field=None),
)
async def create_video(
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> VideoObject:
    """Queue a text-to-video job and answer its Video object at once (multipart or JSON)."""
    fields, _ = await _read_fields(request, None, state.settings.reference_max_bytes)
    video = parse_request(VideoCreateRequest, fields)
    return await state.openai.create_video(
        video_job(video), principal, idempotency_key, _recorded(video)
    )


@router.get(
    "/videos",
    response_model=VideoList,
    responses={**OPENAI_AUTHENTICATED_ERRORS, **openai_error_responses(400, 403, 404)},
)
async def list_videos(
    state: StateDep,
    principal: PrincipalDep,
    after: Annotated[str | None, Query(description="The last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    user_id: Annotated[UUID | None, Query(description="One user's (a service key)")] = None,
) -> VideoList:
    return await state.openai.list_videos(
        principal, after=after, limit=limit, order=order, user_id=user_id
    )


@router.get(
    "/videos/{video_id}",
    response_model=VideoObject,
    responses={**OPENAI_AUTHENTICATED_ERRORS, **openai_error_responses(404)},
)
async def get_video(video_id: str, state: StateDep, principal: PrincipalDep) -> VideoObject:
    return await state.openai.get_video(video_id, principal)


@router.delete(
    "/videos/{video_id}",
    response_model=VideoDeleted,
    responses={**OPENAI_AUTHENTICATED_ERRORS, **openai_error_responses(404, 502)},
)
async def delete_video(video_id: str, state: StateDep, principal: PrincipalDep) -> VideoDeleted:
    """Cancel the video if unfinished and delete its files; its job record stays (expired)."""
    return await state.openai.delete_video(video_id, principal)


@router.get(
    "/videos/{video_id}/content",
    response_class=Response,
    responses={
        200: {
            "description": "The MP4, or its WebP poster (variant=thumbnail)",
            "content": {"video/mp4": {}, "image/webp": {}},
        },
        307: {"description": "Object storage: the file's signed URL, in Location"},
        **OPENAI_AUTHENTICATED_ERRORS,
        **openai_error_responses(400, 404, 410, 502),
    },
)
async def video_content(
    video_id: str,
    state: StateDep,
    principal: PrincipalDep,
    variant: Annotated[str, Query(description="video or thumbnail")] = "video",
) -> Response:
    """The file, streamed from local storage, or a 307 to its signed URL in object storage
    (the SDKs follow it; curl needs -L)."""
    content = await state.openai.video_content(video_id, principal, variant)
    if content.path is not None:
        return FileResponse(content.path, media_type=content.media_type)
    assert content.url is not None
    return RedirectResponse(content.url, status_code=307)
