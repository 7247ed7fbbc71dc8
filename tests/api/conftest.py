"""The HTTP app in-process (no Ray) over real PostgreSQL, local storage and tiny models."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from ourvidz_serve.api.app import create_app
from ourvidz_serve.settings import Settings
from tests.conftest import TEST_API_KEY
from tests.inprocess import InProcessModels, TinyRunners, running_workers

JWT_SECRET = "a-jwt-secret-of-at-least-32-bytes-for-tests"


@pytest.fixture
def secure_settings(settings: Settings) -> Settings:
    """Settings that also accept user tokens signed with ``JWT_SECRET``."""
    return settings.model_copy(update={"jwt_secret": SecretStr(JWT_SECRET)})


@pytest.fixture(scope="session")
def tiny_models(tiny_runners: TinyRunners) -> InProcessModels:
    return InProcessModels(tiny_runners.enhancer)


@pytest.fixture
async def client(
    settings: Settings, tiny_models: InProcessModels, tiny_runners: TinyRunners, repository
) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client; the app's lifespan runs, and queue workers run the jobs."""
    app = create_app(settings, tiny_models)
    async with app.router.lifespan_context(app), running_workers(settings, tiny_runners):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://127.0.0.1:8000",
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        ) as http:
            yield http
