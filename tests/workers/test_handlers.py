"""Job handlers with the tiny runners: one result per job, failures kept to their job."""

from __future__ import annotations

from uuid import UUID

from ourvidz_serve.catalog import JOB_TYPES, StepCache
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.workers.handlers import Generated, SDXLJobHandler, WanJobHandler
from tests.inprocess import TinyRunners

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")


class EnhancerThatIsDown:
    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        raise ConnectionError("enhancer replica unreachable")


async def claimed(repository: JobRepository, queue: str, units: int, *bodies: dict):
    for body in bodies:
        request = JobRequest.model_validate({"prompt": "a fox at dawn"} | body)
        await repository.insert_job(plan_job(request, USER))
    return await repository.claim_jobs(queue, units, "handler-test", 30.0)


async def test_an_enhanced_job_runs_on_its_own_prompt_when_the_enhancer_is_down(
    repository, tiny_runners: TinyRunners
):
    [job] = await claimed(repository, "wan_queue", 1, {"job_type": "image7b_fast_enhanced"})
    [result] = await WanJobHandler(tiny_runners.wan, EnhancerThatIsDown()).run([job])
    assert isinstance(result, Generated)
    assert result.prompt == "a fox at dawn"
    assert result.metadata["enhancement_fallback"] is True
    assert "enhancer replica unreachable" in result.metadata["enhancement_warning"]
    assert result.outputs[0].mime_type == "image/png"
    assert "step_cache" not in result.metadata, "no cache configured for this type"


async def test_a_job_type_with_a_step_cache_runs_cached_and_records_it(
    repository, tiny_runners: TinyRunners
):
    [job] = await claimed(repository, "wan_queue", 1, {"job_type": "image_fast"})
    handler = WanJobHandler(
        tiny_runners.wan,
        EnhancerThatIsDown(),
        step_caches={"image_fast": StepCache.TAYLOR_SEER, "video_fast": StepCache.MAG},
    )
    [result] = await handler.run([job])
    assert isinstance(result, Generated)
    assert result.metadata["step_cache"] == "taylor_seer"
    # TaylorSeer (lite) computes steps 0-2 and every 5th after (4, 9, ..., 24) of the 25, for
    # the cond and the uncond pass; the other calls skip every block.
    calls = JOB_TYPES["image_fast"].steps * 2
    assert result.metadata["step_cache_computed_calls"] == 8 * 2
    assert result.metadata["step_cache_skipped_calls"] == calls - 8 * 2
    assert result.outputs[0].mime_type == "image/png"
    assert not tiny_runners.wan.pipe.transformer.is_cache_enabled, "removed after the call"


async def test_a_job_with_an_unreadable_reference_fails_alone_in_its_batch(
    repository, tiny_runners: TinyRunners, tmp_path
):
    storage = LocalStorage(tmp_path, "http://127.0.0.1:8000", b"k" * 32, 60)
    await storage.start()
    await storage.put("reference_images", f"{USER}/bad.png", b"not an image", "image/png")
    jobs = await claimed(
        repository,
        "sdxl_queue",
        6,
        {"job_type": "sdxl_image_fast", "num_images": 3},
        {"job_type": "sdxl_image_fast", "num_images": 3},
    )
    bad_request = JobRequest.model_validate(
        {
            "job_type": "sdxl_image_fast",
            "prompt": "a fox at dawn",
            "reference_image_key": f"{USER}/bad.png",
        }
    )
    await repository.insert_job(plan_job(bad_request, USER))
    [bad] = await repository.claim_jobs("sdxl_queue", 6, "handler-test", 30.0)
    results = await SDXLJobHandler(tiny_runners.sdxl, storage).run([*jobs, bad])
    assert [type(result).__name__ for result in results] == [
        "Generated",
        "Generated",
        "InvalidRequest",
    ]
    good = [result for result in results if isinstance(result, Generated)]
    assert [len(result.outputs) for result in good] == [3, 3]
    assert {result.metadata["pipeline_batch_images"] for result in good} == {6}
