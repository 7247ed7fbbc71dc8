"""The API's machine-readable contract: the OpenAPI document and JSON Schemas of the job
request, the job resource and the callback payload.

All are generated from the code; ``python -m ourvidz_serve.schemas`` (``make schemas``)
rewrites ``schemas/openapi.json`` and ``schemas/*.schema.json``, and a test fails when the
committed files drift from it. The platform generates its TypeScript types from them (see
``clients/typescript``), so closed sets reach it as enums.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ourvidz_serve.api.app import create_app
from ourvidz_serve.jobs.protocol import CallbackPayload, JobRequest, JobResource
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult
from ourvidz_serve.settings import Settings

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "schemas"
OPENAPI = "openapi.json"
MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "job_request.schema.json": (JobRequest, "validation"),
    "job.schema.json": (JobResource, "serialization"),
    "callback.schema.json": (CallbackPayload, "serialization"),
}


class _NoModels:
    """A model client for building the app only: the document never calls it."""

    async def check(self) -> dict[str, Any]:
        raise RuntimeError("no model deployments: this app only renders its OpenAPI document")

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        raise RuntimeError("no model deployments: this app only renders its OpenAPI document")

    async def replicas(self) -> dict[str, int]:
        raise RuntimeError("no model deployments: this app only renders its OpenAPI document")


def openapi_document() -> dict[str, Any]:
    """The document the ingress serves at ``GET /openapi.json``.

    Building the app opens nothing (its lifespan opens the database and storage), so this
    needs no database, storage or Ray. The settings are the defaults, never the environment,
    so that the document is the same wherever it is rendered; the one API key, which
    ``create_app`` requires, is random and never used.
    """
    settings = Settings.model_construct(api_keys=[secrets.token_urlsafe(32)])
    return create_app(settings, _NoModels()).openapi()


def render() -> dict[str, str]:
    """Every generated file's name under ``schemas/`` and its text."""
    rendered = {}
    for name, (model, mode) in MODELS.items():
        schema = model.model_json_schema(mode=mode)  # type: ignore[arg-type]
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        rendered[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    # FastAPI's order (paths as routed, properties as declared) is kept: the generated
    # TypeScript follows it.
    rendered[OPENAPI] = json.dumps(openapi_document(), indent=2) + "\n"
    return rendered


def main() -> None:
    for name, text in render().items():
        (SCHEMAS_DIR / name).write_text(text)
        print(f"wrote {SCHEMAS_DIR / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
