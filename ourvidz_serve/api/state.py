"""What a running app holds: opened in the lifespan, reached by routes through dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from ourvidz_serve.api.auth import Authenticator
from ourvidz_serve.api.model_client import ModelClient
from ourvidz_serve.jobs.enhancement import EnhancementService
from ourvidz_serve.jobs.limits import RateLimiter
from ourvidz_serve.jobs.loras import LoraService
from ourvidz_serve.jobs.openai_compat import OpenAICompatService
from ourvidz_serve.jobs.references import ReferenceService
from ourvidz_serve.jobs.retention import UserDataService
from ourvidz_serve.jobs.scheduling import QueueService, UsageService
from ourvidz_serve.jobs.service import JobService
from ourvidz_serve.observability.exposition import MetricsFeed
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage
from ourvidz_serve.workers.supervision import HealthCheck, Supervisor


@dataclass
class AppState:
    settings: Settings
    repository: JobRepository
    storage: Storage
    models: ModelClient
    jobs: JobService
    enhancement: EnhancementService
    references: ReferenceService
    users: UserDataService
    limiter: RateLimiter
    authenticator: Authenticator
    metrics_feed: MetricsFeed
    supervisor: Supervisor
    health: HealthCheck
    queues: QueueService
    usage: UsageService
    openai: OpenAICompatService
    loras: LoraService
