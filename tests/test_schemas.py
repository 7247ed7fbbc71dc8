import json

import jsonschema
import pytest

from ourvidz_serve.schemas import MODELS, OPENAPI, SCHEMAS_DIR, openapi_document, render


def test_committed_openapi_document_and_json_schemas_match_the_code():
    """A changed API fails here until `make schemas` rewrites schemas/ (and the TypeScript
    types generated from it)."""
    rendered = render()
    assert set(rendered) == {*MODELS, OPENAPI}
    for name, text in rendered.items():
        committed = (SCHEMAS_DIR / name).read_text()
        assert committed == text, f"schemas/{name} drifted: run `make schemas`"


def test_the_openapi_document_renders_without_a_database_and_ignores_the_environment(
    monkeypatch,
):
    """Rendered from the defaults, so the committed file is the same on every machine."""
    before = openapi_document()
    monkeypatch.setenv("OURVIDZ_DATABASE_URL", "postgresql://nobody@unreachable.invalid/none")
    monkeypatch.setenv("OURVIDZ_MAX_BODY_BYTES", "not a number")
    assert openapi_document() == before
    assert {"/v1/jobs", "/v1/enhance"} <= set(before["paths"])


def test_job_request_schema_accepts_a_valid_request_and_rejects_a_bad_one():
    schema = json.loads((SCHEMAS_DIR / "job_request.schema.json").read_text())
    jsonschema.validate({"job_type": "sdxl_image_fast", "prompt": "a cat"}, schema)
    with pytest.raises(jsonschema.ValidationError, match="-1"):
        jsonschema.validate({"job_type": "sdxl_image_fast", "prompt": "a cat", "seed": -1}, schema)
