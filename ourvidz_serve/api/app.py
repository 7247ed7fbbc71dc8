"""The FastAPI app factory. Its lifespan opens the pool and storage and runs a reaper."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from ourvidz_serve import __version__
from ourvidz_serve.api.auth import Authenticator
from ourvidz_serve.api.body_limit import BodySizeLimit
from ourvidz_serve.api.console import ConsoleSecurityHeaders, content_security_policy
from ourvidz_serve.api.console import router as console_router
from ourvidz_serve.api.enhance import router as enhance_router
from ourvidz_serve.api.errors import install_error_handlers
from ourvidz_serve.api.jobs import router as jobs_router
from ourvidz_serve.api.loras import router as loras_router
from ourvidz_serve.api.metrics import router as metrics_router
from ourvidz_serve.api.model_client import ModelClient
from ourvidz_serve.api.openai_compat import UPLOAD_PATHS
from ourvidz_serve.api.openai_compat import router as openai_router
from ourvidz_serve.api.openapi_doc import install_openapi
from ourvidz_serve.api.references import router as references_router
from ourvidz_serve.api.routes import router as service_router
from ourvidz_serve.api.scheduling import router as scheduling_router
from ourvidz_serve.api.state import AppState
from ourvidz_serve.api.users import router as users_router
from ourvidz_serve.jobs.enhancement import EnhancementService
from ourvidz_serve.jobs.events import JobEventHub
from ourvidz_serve.jobs.limits import RateLimiter
from ourvidz_serve.jobs.loras import LoraService
from ourvidz_serve.jobs.openai_compat import OpenAICompatService
from ourvidz_serve.jobs.references import ReferenceService
from ourvidz_serve.jobs.retention import UserDataService
from ourvidz_serve.jobs.scheduling import QueueService, SchedulingPolicy, UsageService
from ourvidz_serve.jobs.service import JobService
from ourvidz_serve.observability.exposition import MetricsFeed, RegistryFeed
from ourvidz_serve.observability.metrics import Metrics, PrometheusBackend
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.redaction import install_log_redaction
from ourvidz_serve.security.fetch import ReferenceFetcher
from ourvidz_serve.security.prompt_policy import PromptPolicy
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import create_storage
from ourvidz_serve.workers.callbacks import deliverer_from_settings
from ourvidz_serve.workers.reaper import reap_once
from ourvidz_serve.workers.supervision import HealthCheck, Supervisor

logger = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024


@asynccontextmanager
async def open_app_state(
    settings: Settings, models: ModelClient, metrics: Metrics, metrics_feed: MetricsFeed
) -> AsyncIterator[AppState]:
    """Open the database and storage and start a reaper; close them in reverse order.

    The ingress runs no jobs; it reaps expired leases too because every replica with a pool
    does, so a crashed model replica's jobs come back even while no model replica is up.
    """
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(open_database(settings))
        storage = create_storage(settings)
        await storage.start()
        stack.push_async_callback(storage.close)
        repository = JobRepository(
            pool,
            direct_dsn=settings.database_direct_url,
            acquire_timeout_s=settings.db_acquire_timeout_s,
        )
        # Its background loops (reaper, callbacks, job events) run supervised: an error is
        # logged and the loop runs again; the replica's health check reports one that keeps
        # failing.
        supervisor = Supervisor(
            restart_max_s=settings.loop_restart_max_s, stall_s=settings.loop_stall_s
        )

        async def reap() -> None:
            await reap_once(repository, settings.max_attempts)

        supervisor.every("reaper", settings.reaper_interval_s, reap)
        references = ReferenceService(
            storage,
            ReferenceFetcher.from_settings(settings),
            max_bytes=settings.reference_max_bytes,
            max_pixels=settings.reference_max_pixels,
        )
        stack.push_async_callback(references.close)
        limiter = RateLimiter(
            repository,
            per_key_per_s=settings.rate_limit_per_key_per_s,
            per_key_burst=settings.rate_limit_per_key_burst,
            per_user_per_s=settings.rate_limit_per_user_per_s,
            per_user_burst=settings.rate_limit_per_user_burst,
        )
        deliverer = deliverer_from_settings(repository, settings, metrics)
        if deliverer is not None:
            stack.push_async_callback(deliverer.aclose)
            supervisor.every("callbacks", 0, deliverer.round)
        events = JobEventHub(repository)
        supervisor.run("job-events", events.run)
        # Stopped before the client, storage and pool they use are closed (LIFO).
        stack.push_async_callback(supervisor.stop)
        policy = PromptPolicy.from_settings(settings)
        scheduling = SchedulingPolicy.from_settings(settings)
        queues = QueueService(repository, models.replicas)
        loras = LoraService(
            repository,
            storage,
            max_rank=settings.sdxl_lora_max_rank,
            max_bytes=settings.sdxl_lora_max_bytes,
            max_per_job=settings.sdxl_max_loras_per_job,
        )
        jobs = JobService(
            repository,
            storage,
            references=references,
            loras=loras,
            policy=policy,
            limiter=limiter,
            events=events,
            max_queued_jobs=settings.max_queued_jobs_per_user,
            queued_jobs_retry_after_s=settings.queued_jobs_retry_after_s,
            metrics=metrics,
            callbacks=settings.callback_url is not None,
            scheduling=scheduling,
            queues=queues,
        )
        jwt_secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        yield AppState(
            settings=settings,
            repository=repository,
            storage=storage,
            models=models,
            jobs=jobs,
            enhancement=EnhancementService(models, policy),
            references=references,
            users=UserDataService(repository, storage, metrics),
            limiter=limiter,
            authenticator=Authenticator(settings.api_keys, jwt_secret),
            metrics_feed=metrics_feed,
            supervisor=supervisor,
            health=HealthCheck(
                repository.ping,
                timeout_s=settings.health_db_timeout_s,
                outage_s=settings.loop_stall_s,
            ),
            queues=queues,
            usage=UsageService(repository, scheduling),
            openai=OpenAICompatService(
                jobs,
                repository,
                storage,
                wait_s=settings.openai_wait_s,
                max_waiting=settings.openai_max_waiting,
            ),
            loras=loras,
        )


def create_app(
    settings: Settings,
    models: ModelClient,
    metrics: Metrics | None = None,
    metrics_feed: MetricsFeed | None = None,
) -> FastAPI:
    """The ingress app. ``metrics`` records, ``metrics_feed`` reads back for ``/metrics``;
    without them (no Ray) both are one local registry."""
    if not settings.api_keys and settings.jwt_secret is None:
        raise ValueError("no API keys and no JWT secret: every request would be refused")
    if metrics is None or metrics_feed is None:
        backend = PrometheusBackend()
        metrics, metrics_feed = Metrics(backend), RegistryFeed(backend.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_app_state(settings, models, metrics, metrics_feed) as state:
            app.state.ourvidz = state
            yield
            app.state.ourvidz = None

    install_log_redaction(settings.secrets())
    app = FastAPI(
        title="ourvidz-serve",
        version=__version__,
        description="Image and video generation jobs for the OurVidz platform.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(service_router)
    app.include_router(jobs_router)
    app.include_router(references_router)
    app.include_router(loras_router)
    app.include_router(enhance_router)
    app.include_router(users_router)
    app.include_router(metrics_router)
    app.include_router(scheduling_router)
    app.include_router(openai_router)
    app.include_router(console_router)
    app.add_middleware(ConsoleSecurityHeaders, policy=content_security_policy(settings))
    app.add_middleware(
        BodySizeLimit,
        default_limit=settings.max_body_bytes,
        # An upload is an image plus the multipart framing around it.
        limits={
            **{
                path: settings.reference_max_bytes + MULTIPART_OVERHEAD_BYTES
                for path in (references_router.prefix, *UPLOAD_PATHS)
            },
            loras_router.prefix: settings.sdxl_lora_max_bytes + MULTIPART_OVERHEAD_BYTES,
        },
    )
    return app
