"""The one typed settings object. Read once (in the app builder) and passed down."""

from __future__ import annotations

import os
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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

    database_url: SecretStr | None = None
    data_dir: Path = Path("./.ourvidz")
    db_pool_min_size: int = 2
    db_pool_max_size: int = 10

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

    callback_url: str | None = None
    callback_secret: SecretStr | None = None

    dispatch_enabled: bool = Field(
        True, description="Run a dispatcher in each ingress replica (off: accept jobs only)"
    )
    dispatch_poll_interval_s: float = Field(0.5, gt=0)
    sdxl_max_inflight: int = Field(12, ge=1, description="SDXL jobs one dispatcher runs at once")
    wan_max_inflight: int = Field(2, ge=1, description="WAN jobs one dispatcher runs at once")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

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
        """Secret for local signed URLs; derived from the first API key when not set."""
        if self.url_signing_secret is not None:
            return self.url_signing_secret.get_secret_value().encode()
        if not self.api_keys:
            raise ValueError("no url_signing_secret and no API key to derive one from")
        return ("ourvidz-url-signing:" + self.api_keys[0]).encode()


def _load_or_create_dev_key(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "dev-" + secrets.token_urlsafe(24)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key
