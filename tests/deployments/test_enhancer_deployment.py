"""The Enhancer deployment on a real, local Ray Serve: batching without shared failure."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ourvidz_serve.errors import InvalidRequest
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceTarget
from ourvidz_serve.settings import Settings
from tests.launcher import free_loopback_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def enhancer(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[object]:
    """A Ray instance of this test's own (never a running one), Serve, and the deployment."""
    import ray
    from ray import serve

    from ourvidz_serve.deployments.models import EnhancerDeployment

    # A short path: Ray's socket paths must fit 107 bytes.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ovz-ray-"))
    monkeypatch_module.delenv("RAY_ADDRESS", raising=False)
    monkeypatch_module.setenv("RAY_TMPDIR", str(ray_tmpdir))
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=str(ray_tmpdir))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_loopback_port()})
        app = EnhancerDeployment.options(  # type: ignore[attr-defined]
            ray_actor_options={"num_cpus": 0.25}
        ).bind(Settings(device="cpu"))
        yield serve.run(app, name="enhancer-test", route_prefix=None)
        serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


async def test_a_bad_request_fails_its_own_call_and_its_batch_mates_are_enhanced(
    enhancer,
) -> None:
    good = [[EnhanceRequest(f"a lighthouse number {i}", EnhanceTarget.WAN_VIDEO)] for i in range(6)]
    bad = [EnhanceRequest("   ", EnhanceTarget.SDXL)]
    calls = [enhancer.enhance.remote(requests) for requests in [*good[:3], bad, *good[3:]]]
    answers = await asyncio.gather(*calls, return_exceptions=True)

    failed = answers.pop(3)
    assert isinstance(failed, InvalidRequest), failed
    assert "the prompt is empty" in str(failed)
    for requests, answer in zip(good, answers, strict=True):
        assert not isinstance(answer, BaseException), answer
        [result] = answer
        assert result.model == "qwen2-tiny-random"
        if result.used_fallback:
            assert result.enhanced_prompt == requests[0].prompt
            assert "failed" not in (result.warning or ""), "the batch call itself failed"
    sizes = await enhancer.recent_batch_sizes.remote()
    assert sum(sizes) == 6, "the bad request never joined a batch"
    assert max(sizes) > 1, f"concurrent prompts shared no generate call: {sizes}"
