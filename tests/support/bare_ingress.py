"""The ingress app in-process with no model and no queue worker: jobs stay where tests put
them, so a test sets up every state itself through the repository."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from ourvidz_serve.api.app import create_app
from ourvidz_serve.api.state import AppState
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult
from ourvidz_serve.settings import Settings
from tests.conftest import TEST_API_KEY


class NoModels:
    """A ModelClient for routes that never reach a model."""

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        raise AssertionError("no model in these tests")

    async def check(self) -> dict[str, str]:
        return {}

    async def replicas(self) -> dict[str, int]:
        return {}


@asynccontextmanager
async def bare_ingress(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    """A client authenticated with the service key, and the running app's state."""
    app = create_app(settings, NoModels())
    async with app.router.lifespan_context(app):
        state = app.state.ourvidz
        assert isinstance(state, AppState)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://127.0.0.1:8000",
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        ) as http:
            yield http, state
