from uuid import UUID, uuid4

from ourvidz_serve.jobs.planning import asset_seed, plan_job, request_fingerprint
from ourvidz_serve.jobs.protocol import RESERVED_METADATA_KEYS, AssetKind, JobRequest

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")

COMMON_KEYS = {
    "model_variant",
    "queue",
    "seed",
    "num_images",
    "expected_generation_time",
    "content_type",
    "file_extension",
    "prompt_length",
    "prompt_word_count",
}
WAN_KEYS = {"sample_steps", "sample_guide_scale", "sample_solver", "sample_shift", "frame_num"}


def request(**fields) -> JobRequest:
    return JobRequest.model_validate({"job_type": "sdxl_image_fast", "prompt": "a cat"} | fields)


def test_image_i_of_a_job_gets_seed_s_plus_i_and_records_it():
    plan = plan_job(request(num_images=6, seed=100), USER)
    assert [asset.seed for asset in plan.assets] == [100, 101, 102, 103, 104, 105]
    assert [asset.metadata["seed"] for asset in plan.assets] == [100, 101, 102, 103, 104, 105]
    assert plan.metadata["seed"] == 100


def test_seeds_wrap_around_at_2_to_the_32():
    assert asset_seed(2**32 - 1, 1) == 0
    plan = plan_job(request(num_images=3, seed=2**32 - 2), USER)
    assert [asset.seed for asset in plan.assets] == [2**32 - 2, 2**32 - 1, 0]


def test_a_missing_seed_is_chosen_and_recorded():
    plan = plan_job(request(), USER)
    assert 0 <= plan.metadata["seed"] < 2**32
    assert plan.assets[0].seed == plan.metadata["seed"]


def test_sdxl_plan_has_one_image_row_per_image_with_contract_keys():
    job_id = uuid4()
    plan = plan_job(request(num_images=3), USER, job_id=job_id)
    assert plan.asset_kind is AssetKind.IMAGE
    assert [a.path for a in plan.assets] == [f"{USER}/{job_id}_{i}.png" for i in range(3)]
    assert {a.bucket for a in plan.assets} == {"sdxl_image_fast"}
    assert COMMON_KEYS | {"negative_prompt"} <= set(plan.metadata)
    assert plan.metadata["queue"] == "sdxl_queue"
    assert plan.metadata["model_variant"] == "lustify_sdxl"
    assert plan.metadata["expected_generation_time"] == 12
    assert plan.metadata["negative_prompt"]


def test_explicit_negative_prompt_overrides_the_generated_one():
    plan = plan_job(request(negative_prompt="blurry"), USER)
    assert plan.metadata["negative_prompt"] == "blurry"


def test_wan_video_plan_has_one_video_row_and_rounds_frames():
    job_id = uuid4()
    plan = plan_job(request(job_type="video_high", frame_num=83), USER, job_id=job_id)
    assert plan.asset_kind is AssetKind.VIDEO
    assert [a.path for a in plan.assets] == [f"{USER}/{job_id}.mp4"]
    assert COMMON_KEYS | WAN_KEYS <= set(plan.metadata)
    assert plan.metadata["frame_num"] == 81
    assert plan.metadata["frame_num_requested"] == 83
    assert plan.metadata["sample_solver"] == "unipc"
    assert plan.metadata["sample_shift"] == 5.0
    assert "negative_prompt" not in plan.metadata


def test_user_metadata_is_merged_and_every_key_the_service_writes_is_reserved():
    for body in (
        {"num_images": 3, "negative_prompt": "blur"},
        {"job_type": "video_high", "frame_num": 17},
        {"job_type": "image7b_fast_enhanced"},
    ):
        plan = plan_job(request(metadata={"source": "workspace"}, **body), USER)
        assert plan.metadata["source"] == "workspace"
        assert set(plan.metadata) - {"source"} <= RESERVED_METADATA_KEYS


def test_fingerprint_tells_different_bodies_apart():
    assert request_fingerprint(request(seed=1), USER) == request_fingerprint(request(seed=1), USER)
    assert request_fingerprint(request(seed=1), USER) != request_fingerprint(request(seed=2), USER)


def test_a_video_plans_its_poster_frame_beside_it_and_an_image_none():
    video = plan_job(request(job_type="video_fast"), USER)
    [asset] = video.assets
    assert asset.path == f"{USER}/{video.job_id}.mp4"
    assert asset.metadata["thumbnail_path"] == f"{USER}/{video.job_id}_poster.webp"
    image = plan_job(request(job_type="image_fast"), USER)
    assert "thumbnail_path" not in image.assets[0].metadata
