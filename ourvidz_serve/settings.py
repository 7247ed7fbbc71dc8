"""The one typed settings object. Read once (in the app builder) and passed down."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ourvidz_serve.catalog import JOB_TYPES, ModelFamily, StepCache, Tier

MIN_JWT_SECRET_BYTES = 32


class ModelProfile(StrEnum):
    """How model weights are obtained.

    ``tiny``: real pipeline classes from small configs with random weights (CPU, seconds).
    ``full-random``: the real architectures at full size with random weights (GPU benchmarks).
    ``weights``: real checkpoints from the configured local paths; start-up fails without them.
    """

    TINY = "tiny"
    FULL_RANDOM = "full-random"
    WEIGHTS = "weights"


class StorageBackend(StrEnum):
    LOCAL = "local"
    S3 = "s3"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OURVIDZ_", extra="ignore", frozen=True)

    model_profile: ModelProfile = ModelProfile.TINY
    sdxl_checkpoint: Path | None = None
    wan_model_dir: Path | None = None
    qwen_model_dir: Path | None = None
    device: str = Field("auto", description="torch device for the models: auto, cpu, cuda, cuda:N")

    sdxl_ip_adapter: Path | None = Field(
        None,
        description="A local IP-Adapter for SDXL (a diffusers-layout folder with the adapter "
        "under sdxl_models/ and its image encoder), used by the 'style' and 'character' "
        "reference types; unset, they run plain image-to-image. The weights profile loads it; "
        "full-random builds the same architecture with random weights when it is set",
    )
    sdxl_ip_adapter_weight_name: str = "ip-adapter_sdxl.safetensors"

    sdxl_lora_max_rank: int = Field(
        128, ge=1, description="Highest LoRA rank an upload may have (POST /v1/loras)"
    )
    sdxl_lora_max_bytes: int = Field(
        1 << 30, ge=1, description="Largest LoRA file an upload may be, in bytes"
    )
    sdxl_lora_cache: int = Field(
        8,
        ge=1,
        description="LoRAs one SDXL replica keeps parsed in CPU memory (least recently used "
        "goes first); the memory plan counts this many at the largest allowed size",
    )
    sdxl_max_loras_per_job: int = Field(
        3, ge=1, le=8, description="LoRAs one SDXL job may name in `loras`"
    )
    lora_affinity_max_wait_s: float = Field(
        30.0,
        ge=0,
        description="Longest a queued job waits because a replica prefers jobs whose LoRAs it "
        "holds; 0 turns the preference off (plain fair order)",
    )
    lora_affinity_window: int = Field(
        16,
        ge=1,
        le=1000,
        description="How many jobs at the head of the fair order a claim looks at for one "
        "whose LoRAs the replica holds",
    )

    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of the GPU a deployment profile is planned for (`ourvidz-serve "
        "plan`); replicas read the real figure from CUDA at start-up",
    )
    attention_backend: str | None = Field(
        None,
        description="diffusers attention backend for the UNet / transformer (e.g. 'flash', "
        "'_flash_3', 'sage'); unset: PyTorch SDPA, which picks flash or memory-efficient "
        "kernels itself",
    )
    channels_last: bool = Field(True, description="SDXL UNet in channels-last layout (CUDA)")
    vae_slicing: bool = Field(
        True, description="Decode a batch's latents one image at a time (SDXL, at 1024² x 6)"
    )
    vae_tiling: bool = Field(
        False, description="Decode in overlapping tiles (SDXL and WAN); for sizes past 1024²"
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the UNet / transformer; replicas compile with a warm-up "
        "call at start-up, before they are ready, so no job pays for it",
    )
    wan_step_cache: dict[str, StepCache] = Field(
        default_factory=dict,
        description="Step cache per WAN job type, as JSON, e.g. "
        '{"video_fast": "first_block"}; off for every type by default',
    )

    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL DSN; may point at a transaction-mode pooler (PgBouncer, "
        "Supavisor): nothing over it relies on session state or startup parameters",
    )
    database_direct_url: SecretStr | None = Field(
        None,
        description="A session (direct) DSN for LISTEN and migrations; unset: database_url",
    )
    data_dir: Path = Path("./.ourvidz")
    db_pool_min_size: int = 2
    db_pool_max_size: int = 10
    db_command_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest any one statement may take: a half-open socket or a lock wait "
        "ends in an error the caller retries, never a loop hung for ever",
    )
    db_acquire_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a pooled connection"
    )

    storage_backend: StorageBackend = StorageBackend.LOCAL
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_bucket_template: str = Field(
        "ourvidz-{bucket}",
        description=(
            "Real S3 bucket for a logical bucket. '{bucket}' is replaced by the logical name "
            "with '_' turned into '-'. A template without '{bucket}' names one shared bucket "
            "and the logical bucket becomes a key prefix."
        ),
    )
    public_base_url: str = Field(
        "http://127.0.0.1:8000", description="Base of the signed URLs the local backend returns"
    )
    signed_url_ttl_s: int = Field(3600, ge=1)
    url_signing_secret: SecretStr | None = None

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    jwt_secret: SecretStr | None = None

    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body of a JSON route (413 above it)"
    )
    reference_max_bytes: int = Field(
        16_777_216, ge=1024, description="Largest reference image, uploaded or fetched"
    )
    reference_max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Most pixels a reference image may declare; checked on the header, "
        "before any decoding",
    )
    reference_fetch_timeout_s: float = Field(
        10.0, gt=0, description="Total time to fetch a reference URL, redirects included"
    )
    reference_fetch_allow_http: bool = Field(
        False, description="Also fetch plain-http reference URLs (https only by default)"
    )
    reference_fetch_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="FOR TESTS ONLY: origins (scheme://ip:port) fetched even though their "
        "address is refused (e.g. one loopback test server)",
    )

    prompt_policy_minors_rule: bool = Field(
        True, description="The default deny rule: sexual content involving minors"
    )
    prompt_deny_patterns: list[str] = Field(
        default_factory=list,
        description="Extra deny rules: regular expressions matched against the normalized "
        "prompt (lower case, homoglyphs, leetspeak and spacing undone), as a JSON list",
    )
    prompt_classifier: str | None = Field(
        None,
        description="'module:callable' returning an external classifier (see "
        "ourvidz_serve.security.prompt_policy.PromptClassifier)",
    )

    rate_limit_per_key_per_s: float = Field(
        200.0, ge=0, description="Requests per second per service API key (0: unlimited)"
    )
    rate_limit_per_key_burst: int = Field(400, ge=1)
    rate_limit_per_user_per_s: float = Field(
        5.0, ge=0, description="Requests per second per user, by token or on their behalf"
    )
    rate_limit_per_user_burst: int = Field(30, ge=1)
    max_queued_jobs_per_user: int = Field(
        50, ge=0, description="Queued (not yet started) jobs a user may have (0: unlimited)"
    )
    queued_jobs_retry_after_s: int = Field(
        15, ge=1, description="Retry-After of a submission refused for too many queued jobs"
    )
    openai_wait_s: float = Field(
        300.0,
        gt=0,
        description="How long POST /v1/images/generations and /v1/images/edits wait for their "
        "job; past it they answer 504 naming the job, which goes on (fetch it from /v1/jobs)",
    )
    ray_dashboard_url: str | None = Field(
        None, description="The Ray dashboard's URL, linked from the console's queue panel"
    )
    grafana_url: str | None = Field(
        None, description="Grafana's URL (the service's dashboard), linked from the console"
    )
    openai_max_waiting: int = Field(
        128,
        ge=1,
        description="Image requests of the OpenAI routes that may wait at once per ingress "
        "replica (each holds one of its max_ongoing_requests); beyond it, 429",
    )

    tier_weights: dict[Tier, float] = Field(
        default_factory=lambda: {Tier.PREMIUM: 4.0, Tier.STANDARD: 2.0, Tier.BULK: 1.0},
        description="Each tier's share of a queue's GPU time per backlogged user (fair order), "
        'as JSON, e.g. {"premium": 4, "standard": 2, "bulk": 1}; a tier left out weighs 1',
    )
    quota_gpu_seconds: dict[Tier, float] = Field(
        default_factory=dict,
        description="GPU seconds a user of each tier may spend per quota window, as JSON, e.g. "
        '{"standard": 3600}; a tier left out has no quota',
    )
    quota_window_s: float = Field(
        86400.0, gt=0, description="The rolling window GPU-time quotas are counted over"
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Finished jobs' files are deleted this long after they ended, and their "
        "rows marked expired (fractions allowed); unset: kept for ever",
    )
    retention_sweep_interval_s: float = Field(
        300.0, gt=0, description="How often each model replica's retention sweeper runs"
    )

    callback_url: str | None = None
    callback_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing secret ('whsec_' + base64, or any string); "
        "several comma-separated while one is rotated: each signs every delivery",
    )
    callback_timeout_s: float = Field(10.0, gt=0, description="One delivery attempt's time cap")
    callback_max_attempts: int = Field(
        12, ge=1, description="Attempts before a delivery is given up (about 2 h by default)"
    )
    callback_retry_base_s: float = Field(
        2.0, gt=0, description="First retry delay; doubles per attempt, with full jitter"
    )
    callback_retry_max_s: float = Field(1800.0, gt=0, description="Longest retry delay")
    callback_poll_interval_s: float = Field(
        1.0, gt=0, description="How often a deliverer looks for due deliveries"
    )

    workers_enabled: bool = Field(
        True,
        description="Model replicas claim and run queued jobs (off: jobs are accepted and stay "
        "queued, e.g. to benchmark submission alone)",
    )
    queue_poll_interval_s: float = Field(
        0.5, gt=0, description="How often a worker looks for work when no NOTIFY woke it"
    )
    sdxl_batch_images: int = Field(
        6, ge=1, le=64, description="Images one SDXL replica claims and runs in one call"
    )
    wan_concurrency: int = Field(1, ge=1, description="WAN jobs one replica runs at once")
    lease_s: float = Field(
        30.0, gt=0, description="A claim's lease; a replica that stops renewing it loses the job"
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often held leases renew")
    reaper_interval_s: float = Field(5.0, gt=0, description="How often expired leases are reaped")
    max_attempts: int = Field(
        3, ge=1, description="Claims a job may use before an expired lease fails it for good"
    )
    worker_shutdown_grace_s: float = Field(
        15.0,
        ge=0,
        description="A stopping replica finishes running jobs this long, then releases them; "
        "keep it below the deployment's graceful_shutdown_timeout_s",
    )
    storage_put_attempts: int = Field(5, ge=1, description="Tries per file upload")
    loop_restart_max_s: float = Field(
        5.0, gt=0, description="Longest backoff before a failed background loop runs again"
    )
    loop_stall_s: float = Field(
        60.0,
        gt=0,
        description="A background loop failing for this long without a success fails the "
        "replica's health check (Serve then replaces the replica)",
    )
    health_db_timeout_s: float = Field(
        5.0, gt=0, description="The health check fails when the pool cannot answer in this time"
    )
    record_retry_s: float = Field(
        600.0,
        gt=0,
        description="How long a worker keeps retrying to record an outcome while the database "
        "is unavailable",
    )

    @field_validator("api_keys", "reference_fetch_allowed_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("wan_step_cache")
    @classmethod
    def _step_cache_for_wan_types(cls, value: dict[str, StepCache]) -> dict[str, StepCache]:
        wan_types = {name for name, spec in JOB_TYPES.items() if spec.model is ModelFamily.WAN}
        unknown = sorted(set(value) - wan_types)
        if unknown:
            raise ValueError(
                f"wan_step_cache names {', '.join(unknown)}; WAN job types are "
                f"{', '.join(sorted(wan_types))}"
            )
        return value

    @field_validator("tier_weights", "quota_gpu_seconds")
    @classmethod
    def _positive_per_tier(cls, value: dict[Tier, float]) -> dict[Tier, float]:
        # A zero weight would divide by zero at submission; a negative one would run a tier's
        # virtual time backwards, ahead of everyone.
        bad = {tier.value: figure for tier, figure in value.items() if not figure > 0}
        if bad:
            raise ValueError(f"every tier's figure must be greater than 0, got {bad}")
        return value

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        # Under half: the health check fails a replica whose leases went unrenewed for half a
        # lease, which must leave room for a heartbeat round.
        if 2 * self.heartbeat_interval_s >= self.lease_s:
            raise ValueError(
                "heartbeat_interval_s must be shorter than half of lease_s "
                f"({self.heartbeat_interval_s:g} s for a lease of {self.lease_s:g} s)"
            )
        return self

    @model_validator(mode="after")
    def _strong_jwt_secret(self) -> Settings:
        if self.jwt_secret is not None:
            length = len(self.jwt_secret.get_secret_value().encode())
            if length < MIN_JWT_SECRET_BYTES:
                raise ValueError(
                    f"OURVIDZ_JWT_SECRET is {length} bytes; HS256 needs at least "
                    f"{MIN_JWT_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
                )
        return self

    @model_validator(mode="after")
    def _direct_url_of_the_same_database(self) -> Settings:
        if self.database_direct_url is not None and self.database_url is None:
            raise ValueError(
                "OURVIDZ_DATABASE_DIRECT_URL needs OURVIDZ_DATABASE_URL: it is the session "
                "connection of that database (without it, the embedded PostgreSQL is used)"
            )
        return self

    @model_validator(mode="after")
    def _signed_callbacks(self) -> Settings:
        if self.callback_url is not None and self.callback_secret is None:
            raise ValueError("OURVIDZ_CALLBACK_URL needs OURVIDZ_CALLBACK_SECRET to sign them")
        return self

    def secrets(self) -> list[str]:
        """Every configured secret, for log redaction."""
        values = [*self.api_keys]
        for secret in (self.jwt_secret, self.url_signing_secret):
            if secret is not None:
                values.append(secret.get_secret_value())
        if self.callback_secret is not None:
            values.extend(self.callback_secret.get_secret_value().split(","))
        for dsn in (self.database_url, self.database_direct_url):
            password = urlsplit(dsn.get_secret_value()).password if dsn is not None else None
            if password:
                values.append(password)
        return values

    def node_local_state(self) -> list[str]:
        """What these settings keep on one machine's disk: fine on one node, and silently
        divergent on several (each node would start its own database or file store)."""
        local = []
        if self.database_url is None:
            local.append("the embedded PostgreSQL (set OURVIDZ_DATABASE_URL)")
        if self.storage_backend is StorageBackend.LOCAL:
            local.append("local storage (set OURVIDZ_STORAGE_BACKEND=s3)")
        return local

    def check_cluster_size(self, alive_nodes: int) -> None:
        """Refuse node-local state on a Ray cluster of more than one node."""
        local = self.node_local_state()
        if alive_nodes > 1 and local:
            raise ValueError(
                f"this Ray cluster has {alive_nodes} nodes, but the settings keep "
                f"{' and '.join(local)} on one node's disk: every node would see different "
                "jobs and files. Use an external PostgreSQL and S3 on a cluster."
            )

    @property
    def embedded_database_dir(self) -> Path:
        return self.data_dir.resolve() / "postgres"

    @property
    def local_storage_dir(self) -> Path:
        return self.data_dir.resolve() / "storage"

    @property
    def dev_key_path(self) -> Path:
        return self.data_dir.resolve() / "dev-api-key"

    def with_generated_dev_key(self) -> tuple[Settings, str | None]:
        """In the tiny profile with no keys, use a development key; elsewhere require keys.

        The key is made once and kept in the data directory, so restarts and app rebuilds
        keep it (and the signed URLs derived from it) valid.
        """
        if self.api_keys:
            return self, None
        if self.model_profile is not ModelProfile.TINY:
            raise ValueError("OURVIDZ_API_KEYS must be set outside the tiny profile")
        key = _load_or_create_dev_key(self.dev_key_path)
        return self.model_copy(update={"api_keys": [key]}), key

    def signing_key(self) -> bytes:
        """Secret for local signed URLs; derived from the API keys when not set.

        Derived from the sorted keys, so reordering ``OURVIDZ_API_KEYS`` keeps URLs valid;
        adding or removing a key does change it (set ``OURVIDZ_URL_SIGNING_SECRET`` to rotate
        keys without invalidating URLs).
        """
        if self.url_signing_secret is not None:
            return self.url_signing_secret.get_secret_value().encode()
        if not self.api_keys:
            raise ValueError("no url_signing_secret and no API key to derive one from")
        material = "\n".join(sorted(set(self.api_keys))).encode()
        return hmac.new(b"ourvidz-url-signing", material, hashlib.sha256).digest()


def _load_or_create_dev_key(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "dev-" + secrets.token_urlsafe(24)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key
