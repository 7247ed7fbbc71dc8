"""The SDXL LoRA registry: upload (checked before anything is stored), list, retire, and the
lookup a submission makes of the names it gives.

A file is stored once, under its content's sha256 (``loras/sdxl/{digest}.safetensors``); a
name points at one. Jobs record the digest, so a job runs the weights it was submitted with
even if its name is retired, or retired and uploaded again, before it runs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel, Field

from ourvidz_serve.errors import Forbidden, InvalidRequest, NotFound
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import LORA_NAME_PATTERN, LoraChoice
from ourvidz_serve.persistence.repository import JobRepository, LoraRecord, lora_name_taken
from ourvidz_serve.security.loras import inspect_lora
from ourvidz_serve.storage import LORAS_BUCKET, Storage, lora_key

_NAME = re.compile(LORA_NAME_PATTERN)


class LoraResource(BaseModel):
    name: str
    digest: str = Field(description="sha256 of the file: what jobs record and replicas cache")
    rank: int
    size_bytes: int
    format: str = Field(description="Tensor naming of the file: kohya or diffusers")
    dtype: str
    targets: list[str] = Field(description="unet, text_encoder, text_encoder_2")
    created_at: datetime

    @classmethod
    def of(cls, record: LoraRecord) -> LoraResource:
        """The registry row as the API shows it (who uploaded it and storage stay inside)."""
        return cls.model_validate(record, from_attributes=True)


class LoraList(BaseModel):
    data: list[LoraResource]


class LoraService:
    def __init__(
        self,
        repository: JobRepository,
        storage: Storage,
        *,
        max_rank: int,
        max_bytes: int,
        max_per_job: int,
    ) -> None:
        self._repository = repository
        self._storage = storage
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.max_per_job = max_per_job

    async def upload(self, name: str, data: bytes, principal: Principal) -> LoraResource:
        """Check the file (its header only, in a thread: hashing a large file is CPU work),
        then store it and its row. Every refusal comes before anything is stored."""
        _require_service(principal, "upload LoRAs")
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                "a LoRA name is 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit",
                param="name",
            )
        if name in await self._repository.live_loras([name]):
            # Checked before storing, so a clash stores nothing (the insert checks again).
            raise lora_name_taken(name)
        info = await asyncio.to_thread(
            inspect_lora, data, max_rank=self.max_rank, max_bytes=self.max_bytes
        )
        key = lora_key(info.digest)
        # Content-addressed: the same file under another name is stored once.
        if not await self._storage.exists(LORAS_BUCKET, key):
            await self._storage.put(LORAS_BUCKET, key, data, "application/octet-stream")
        record = await self._repository.insert_lora(
            name=name,
            digest=info.digest,
            storage_key=key,
            rank=info.rank,
            size_bytes=info.size_bytes,
            format=info.format,
            dtype=info.dtype,
            targets=info.targets,
            created_by=principal.rate_subject,
        )
        return LoraResource.of(record)

    async def list(self) -> LoraList:
        return LoraList(data=[LoraResource.of(r) for r in await self._repository.list_loras()])

    async def retire(self, name: str, principal: Principal) -> LoraResource:
        """Retire a name: new jobs naming it are refused; queued ones still run."""
        _require_service(principal, "delete LoRAs")
        record = await self._repository.retire_lora(name)
        if record is None:
            raise NotFound(f"no LoRA named {name!r}")
        return LoraResource.of(record)

    async def resolve(self, choices: Sequence[LoraChoice]) -> dict[str, str]:
        """``{name: digest}`` of a request's LoRAs; refuses too many and unknown names."""
        if not choices:
            return {}
        if len(choices) > self.max_per_job:
            raise InvalidRequest(
                f"a job may apply at most {self.max_per_job} LoRAs; {len(choices)} were given",
                param="loras",
            )
        names = [choice.name for choice in choices]
        live = await self._repository.live_loras(names)
        unknown = [name for name in names if name not in live]
        if unknown:
            raise InvalidRequest(
                f"unknown or deleted LoRAs {unknown}; GET /v1/loras lists the registry",
                details={"loras": unknown},
                param="loras",
            )
        return {name: live[name].digest for name in names}


def _require_service(principal: Principal, what: str) -> None:
    if not principal.is_service:
        raise Forbidden(f"only a service API key may {what}")
