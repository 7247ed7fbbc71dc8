from ourvidz_serve.catalog import (
    JOB_TYPES,
    ModelFamily,
    OutputFormat,
    Queue,
    expected_generation_time,
    nearest_wan_frame_count,
)

CONTRACT_TABLE = {
    # job_type: (model, format, steps, guidance, width, height, frames, num_images, enhanced)
    "sdxl_image_fast": ("sdxl", "image", 15, 6.0, 1024, 1024, 1, (1, 3, 6), False),
    "sdxl_image_high": ("sdxl", "image", 25, 7.5, 1024, 1024, 1, (1, 3, 6), False),
    "image_fast": ("wan", "image", 25, 6.5, 832, 480, 1, (1,), False),
    "image_high": ("wan", "image", 50, 7.5, 832, 480, 1, (1,), False),
    "video_fast": ("wan", "video", 25, 6.5, 832, 480, 81, (1,), False),
    "video_high": ("wan", "video", 50, 7.5, 832, 480, 81, (1,), False),
    "image7b_fast_enhanced": ("wan", "image", 25, 6.5, 832, 480, 1, (1,), True),
    "image7b_high_enhanced": ("wan", "image", 50, 7.5, 832, 480, 1, (1,), True),
    "video7b_fast_enhanced": ("wan", "video", 25, 6.5, 832, 480, 81, (1,), True),
    "video7b_high_enhanced": ("wan", "video", 50, 7.5, 832, 480, 81, (1,), True),
}


def test_catalog_holds_exactly_the_contracts_ten_job_types_with_their_defaults():
    assert set(JOB_TYPES) == set(CONTRACT_TABLE)
    for name, expected in CONTRACT_TABLE.items():
        spec = JOB_TYPES[name]
        actual = (
            spec.model.value,
            spec.format.value,
            spec.steps,
            spec.guidance_scale,
            spec.width,
            spec.height,
            spec.num_frames,
            spec.allowed_num_images,
            spec.enhanced,
        )
        assert actual == expected, name
        assert spec.bucket == name
        assert spec.file_extension == ("mp4" if spec.format is OutputFormat.VIDEO else "png")


def test_queue_and_model_type_follow_the_model():
    assert JOB_TYPES["sdxl_image_fast"].queue is Queue.SDXL
    assert JOB_TYPES["video_high"].queue is Queue.WAN
    assert JOB_TYPES["image_fast"].model_type == "wan"
    assert JOB_TYPES["video7b_fast_enhanced"].model_type == "enhanced-7b"
    assert JOB_TYPES["sdxl_image_high"].model is ModelFamily.SDXL


def test_wan_frame_counts_round_to_the_nearest_4k_plus_1():
    assert nearest_wan_frame_count(83) == 81
    assert nearest_wan_frame_count(81) == 81
    assert nearest_wan_frame_count(1) == 1
    assert nearest_wan_frame_count(2) == 1
    assert nearest_wan_frame_count(3) == 1
    assert nearest_wan_frame_count(4) == 5
    assert nearest_wan_frame_count(121) == 121
    assert nearest_wan_frame_count(120) == 121
    assert all((nearest_wan_frame_count(n) - 1) % 4 == 0 for n in range(1, 122))


def test_expected_time_scales_with_images_for_sdxl_only():
    assert expected_generation_time(JOB_TYPES["sdxl_image_fast"], 6) == 24
    assert expected_generation_time(JOB_TYPES["video_high"], 1) == 240
