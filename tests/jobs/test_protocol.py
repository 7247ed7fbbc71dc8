"""Each validation rule of POST /v1/jobs, at the model level (the HTTP tests cover 4xx)."""

import pytest
from pydantic import ValidationError

from ourvidz_serve.jobs.protocol import MAX_METADATA_BYTES, JobRequest

USER = "6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11"


def make(**fields):
    return JobRequest.model_validate({"job_type": "sdxl_image_fast", "prompt": "a cat"} | fields)


def test_accepts_the_seeds_camel_case_payload_with_prompt_in_metadata():
    request = JobRequest.model_validate(
        {
            "jobType": "video_fast",
            "userId": USER,
            "projectId": USER,
            "metadata": {"prompt": "  a fox running  ", "seed": 7, "source": "workspace"},
        }
    )
    assert request.job_type == "video_fast"
    assert request.prompt == "a fox running"
    assert request.seed == 7
    assert str(request.project_id) == USER
    assert request.metadata == {"source": "workspace"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"job_type": "sdxl_image_ultra"}, "unknown job type"),
        ({"prompt": "   "}, "at least 1 character"),
        ({"prompt": "x" * 2001}, "at most 2000 characters"),
        ({"num_images": 2}, "num_images=2 is not allowed"),
        ({"job_type": "image_fast", "num_images": 3}, "num_images=3 is not allowed"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"seed": 2**32}, "less than or equal to 4294967295"),
        ({"job_type": "video_fast", "negative_prompt": "blurry"}, "only supported by SDXL"),
        ({"job_type": "image_fast", "reference_image_key": "u/r.png"}, "only supported by SDXL"),
        ({"reference_type": "pose"}, "'style', 'composition' or 'character'"),
        ({"reference_strength": 0.05}, "greater than or equal to 0.1"),
        ({"reference_strength": 1.5}, "less than or equal to 1"),
        ({"frame_num": 41}, "only supported by WAN video"),
        ({"job_type": "video_fast", "frame_num": 0}, "greater than or equal to 1"),
        ({"job_type": "video_fast", "frame_num": 122}, "less than or equal to 121"),
        ({"project_id": "not-a-uuid"}, "valid UUID"),
        ({"user_id": "42"}, "valid UUID"),
        ({"metadata": {"blob": "x" * MAX_METADATA_BYTES}}, "metadata is"),
        ({"metadata": "not an object"}, "valid dictionary"),
        (
            {"reference_image_url": "https://e.com/a.png", "reference_image_key": "a.png"},
            "not both",
        ),
        ({"colour": "red"}, "Extra inputs are not permitted"),
        ({"seed": True}, "valid integer"),
        ({"seed": "12"}, "valid integer"),
        ({"num_images": 3.0}, "valid integer"),
        ({"job_type": "image_fast", "reference_type": "style"}, "only supported by SDXL"),
        ({"metadata": {"error_type": "forged"}}, "set by the service"),
    ],
)
def test_rejects_invalid_requests_with_a_clear_message(fields, message):
    with pytest.raises(ValidationError) as caught:
        make(**fields)
    assert message in str(caught.value)


def test_explicit_nulls_mean_absent_as_the_seed_payload_sends_them():
    request = make(seed=None, reference_type=None, reference_strength=None, metadata=None)
    assert (request.seed, request.reference_type.value, request.reference_strength) == (
        None,
        "style",
        0.7,
    )
    assert request.metadata == {}


def test_defaults_leave_generation_options_to_the_catalog():
    request = make()
    assert request.num_images is None
    assert request.seed is None
    assert request.reference_strength == 0.7
    assert request.reference_type.value == "style"
