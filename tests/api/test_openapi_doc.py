"""The OpenAPI document is valid as the version it declares (3.1), as served and as committed,
and still tells a reader what the job events stream carries."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openapi_spec_validator import validate

from ourvidz_serve.api.errors import OPENAI_PATHS
from ourvidz_serve.schemas import OPENAPI, SCHEMAS_DIR
from tests.api.test_security_http import serving

EVENTS = "/v1/jobs/{job_id}/events"


@pytest.fixture
async def live_document(secure_settings, tiny_models, repository) -> dict[str, Any]:
    """``GET /openapi.json`` from the running in-process app, as a client fetches it."""
    async with serving(secure_settings, tiny_models) as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()


def committed_document() -> dict[str, Any]:
    return json.loads((SCHEMAS_DIR / OPENAPI).read_text())


async def test_the_served_openapi_document_validates_as_the_version_it_declares(live_document):
    assert live_document["openapi"].startswith("3.1.")
    validate(live_document)  # raises on a keyword the declared version does not have


def test_the_committed_openapi_document_validates_as_the_version_it_declares():
    document = committed_document()
    assert document["openapi"].startswith("3.1.")
    validate(document)


@pytest.mark.parametrize("source", ["served", "committed"])
async def test_the_job_events_route_still_documents_its_stream_and_its_events(
    source, live_document
):
    document = live_document if source == "served" else committed_document()
    operation = document["paths"][EVENTS]["get"]
    ok = operation["responses"]["200"]
    stream = ok["content"]["text/event-stream"]
    # 3.1's form: the schema of an event stream is each event's (3.2 calls it itemSchema).
    assert {"event", "data", "id", "retry"} <= set(stream["schema"]["properties"])
    assert "itemSchema" not in stream
    # The kinds of event are named where a reader looks: the route's and the 200's text.
    for kind in ("status", "progress", "asset"):
        assert kind in ok["description"]
        assert f"``{kind}``" in operation["description"]


@pytest.mark.parametrize("source", ["served", "committed"])
async def test_the_job_events_route_documents_its_errors_as_json(source, live_document):
    """The stream is text/event-stream; its errors are the contract's JSON error body."""
    document = live_document if source == "served" else committed_document()
    responses = document["paths"][EVENTS]["get"]["responses"]
    errors = {status: body for status, body in responses.items() if status[0] in "45"}
    assert {"401", "404", "422", "429", "503"} <= set(errors)
    for body in errors.values():
        assert body["content"] == {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
        }


@pytest.mark.parametrize("source", ["served", "committed"])
async def test_the_openai_routes_document_their_errors_in_openais_shape_and_no_422(
    source, live_document
):
    document = live_document if source == "served" else committed_document()
    openai_paths = [path for path in document["paths"] if path.startswith(OPENAI_PATHS)]
    assert len(openai_paths) == 7, openai_paths
    for path in openai_paths:
        for operation in document["paths"][path].values():
            errors = {s: r for s, r in operation["responses"].items() if s[0] in "45"}
            assert "422" not in errors, path
            assert "401" in errors, path
            for response in errors.values():
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/OpenAIErrorBody"}, path
