import json

import jsonschema
import pytest

from ourvidz_serve.schemas import MODELS, SCHEMAS_DIR, render


def test_committed_json_schemas_match_the_code():
    assert set(render()) == set(MODELS)
    for name, text in render().items():
        committed = (SCHEMAS_DIR / name).read_text()
        assert committed == text, f"{name} drifted: run `make schemas`"


def test_job_request_schema_accepts_a_valid_request_and_rejects_a_bad_one():
    schema = json.loads((SCHEMAS_DIR / "job_request.schema.json").read_text())
    jsonschema.validate({"job_type": "sdxl_image_fast", "prompt": "a cat"}, schema)
    with pytest.raises(jsonschema.ValidationError, match="-1"):
        jsonschema.validate({"job_type": "sdxl_image_fast", "prompt": "a cat", "seed": -1}, schema)
