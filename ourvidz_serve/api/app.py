"""The FastAPI app factory. Its lifespan opens the pool, storage and dispatcher."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from ourvidz_serve import __version__
from ourvidz_serve.api.auth import Authenticator
from ourvidz_serve.api.errors import install_error_handlers
from ourvidz_serve.api.routes import router as service_router
from ourvidz_serve.api.state import AppState
from ourvidz_serve.catalog import Queue
from ourvidz_serve.dispatch.dispatcher import Dispatcher
from ourvidz_serve.dispatch.executor import JobExecutor
from ourvidz_serve.dispatch.model_client import ModelClient
from ourvidz_serve.jobs.router import router as jobs_router
from ourvidz_serve.jobs.service import JobService
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import create_storage

logger = logging.getLogger(__name__)


@asynccontextmanager
async def open_app_state(settings: Settings, models: ModelClient) -> AsyncIterator[AppState]:
    """Open the database, storage and dispatcher; close them in reverse order."""
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(open_database(settings))
        storage = create_storage(settings)
        await storage.start()
        stack.push_async_callback(storage.close)
        repository = JobRepository(pool)
        executor = JobExecutor(repository, storage, models)
        dispatcher = Dispatcher(
            repository,
            executor.run,
            capacities={
                Queue.SDXL.value: settings.sdxl_max_inflight,
                Queue.WAN.value: settings.wan_max_inflight,
            },
            poll_interval_s=settings.dispatch_poll_interval_s,
        )
        if settings.dispatch_enabled:
            await dispatcher.start()
            stack.push_async_callback(dispatcher.stop)
        jwt_secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        yield AppState(
            settings=settings,
            repository=repository,
            storage=storage,
            models=models,
            jobs=JobService(repository, storage),
            dispatcher=dispatcher,
            authenticator=Authenticator(settings.api_keys, jwt_secret),
        )


def create_app(settings: Settings, models: ModelClient) -> FastAPI:
    if not settings.api_keys and settings.jwt_secret is None:
        raise ValueError("no API keys and no JWT secret: every request would be refused")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_app_state(settings, models) as state:
            app.state.ourvidz = state
            yield
            app.state.ourvidz = None

    app = FastAPI(
        title="ourvidz-serve",
        version=__version__,
        description="Image and video generation jobs for the OurVidz platform.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(service_router)
    app.include_router(jobs_router)
    return app
