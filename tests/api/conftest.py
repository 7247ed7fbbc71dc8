"""The HTTP app in-process (no Ray) over real PostgreSQL, local storage and tiny models."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from ourvidz_serve.api.app import create_app
from ourvidz_serve.dispatch.model_client import InProcessModelClient
from ourvidz_serve.pipelines.qwen import QwenEnhancerRunner
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.pipelines.wan import WanPipelineRunner
from ourvidz_serve.settings import Settings
from tests.conftest import TEST_API_KEY


@pytest.fixture(scope="session")
def tiny_models() -> InProcessModelClient:
    settings = Settings()
    return InProcessModelClient(
        SDXLPipelineRunner.build(settings),
        WanPipelineRunner.build(settings),
        QwenEnhancerRunner.build(settings),
    )


@pytest.fixture
async def client(
    settings: Settings, tiny_models: InProcessModelClient, repository
) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client; the app's lifespan (pool, storage, dispatcher) is running."""
    app = create_app(settings, tiny_models)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://127.0.0.1:8000",
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        ) as http:
            yield http
