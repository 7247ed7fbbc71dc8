"""JSON Schemas of the job request, the job resource and the callback payload.

They are generated from the pydantic models; ``python -m ourvidz_serve.schemas`` rewrites
``schemas/*.schema.json`` and a test fails when the files drift from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from ourvidz_serve.jobs.protocol import CallbackPayload, JobRequest, JobResource

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "schemas"
MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "job_request.schema.json": (JobRequest, "validation"),
    "job.schema.json": (JobResource, "serialization"),
    "callback.schema.json": (CallbackPayload, "serialization"),
}


def render() -> dict[str, str]:
    rendered = {}
    for name, (model, mode) in MODELS.items():
        schema = model.model_json_schema(mode=mode)  # type: ignore[arg-type]
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        rendered[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return rendered


def main() -> None:
    for name, text in render().items():
        (SCHEMAS_DIR / name).write_text(text)
        print(f"wrote {SCHEMAS_DIR / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
