"""Callback delivery from the outbox: signed by the Standard Webhooks scheme, retried with
jittered exponential backoff held in the database, every attempt recorded. No Ray.

A delivery never touches its job: a receiver that is down, slow or failing delays only its
own callback, and the deliverer runs beside the workers, never in their way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from ourvidz_serve.observability.metrics import NO_METRICS, Metrics
from ourvidz_serve.persistence.repository import CallbackClaim, JobRecord, JobRepository
from ourvidz_serve.settings import Settings

logger = logging.getLogger(__name__)

CLAIM_BATCH = 16


class CallbackSigner:
    """``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers.

    Several secrets (one being rotated in) each sign every message; the signatures go
    space-separated in one header, and a receiver that knows any one of them verifies it.
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("a callback needs at least one signing secret")
        # A "whsec_" secret is base64 (the library decodes it); any other is used as bytes.
        self._webhooks = [
            Webhook(secret if secret.startswith("whsec_") else secret.encode())
            for secret in secrets
        ]

    @classmethod
    def from_setting(cls, value: str) -> CallbackSigner:
        return cls([secret.strip() for secret in value.split(",") if secret.strip()])

    def headers(self, webhook_id: str, body: str, now: datetime) -> dict[str, str]:
        signatures = " ".join(hook.sign(webhook_id, now, body) for hook in self._webhooks)
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signatures,
            "content-type": "application/json",
        }


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    max_s: float

    def delay_s(self, attempt: int) -> float:
        """Exponential, with equal jitter: half fixed, half random, so retries of many
        callbacks that failed together spread out but never come back at once."""
        ceiling = min(self.max_s, self.base_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def callback_payload(job: JobRecord) -> dict[str, Any]:
    """The seed's standardized body (schemas/callback.schema.json)."""
    return {
        "job_id": str(job.id),
        "status": job.status.value,
        "assets": [asset.path for asset in sorted(job.assets, key=lambda a: a.index)],
        "error_message": job.error_message,
        "metadata": job.metadata,
    }


class CallbackDeliverer:
    def __init__(
        self,
        repository: JobRepository,
        url: str,
        signer: CallbackSigner,
        retry: RetryPolicy,
        *,
        timeout_s: float,
        poll_interval_s: float,
        statement_bound_s: float = 40.0,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._repository = repository
        self._metrics = metrics
        self._url = url
        self._signer = signer
        self._retry = retry
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        # An attempt is three bounded statements (the job and its assets, then the outcome)
        # around one POST capped at timeout_s as a whole: the claim's lock outlasts all of it,
        # so no other deliverer takes the delivery while a slow receiver is still answering.
        self._lock_s = timeout_s + 3 * statement_bound_s + 5
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False)

    @property
    def lock_s(self) -> float:
        return self._lock_s

    async def round(self) -> float:
        """Deliver what is due now; the delay before the next round (none while busy).

        The replica's supervisor runs it in a loop: an error is logged and the round retried.
        """
        delivered = await self.deliver_due()
        return 0.0 if delivered else self._poll_interval_s

    async def aclose(self) -> None:
        await self._client.aclose()

    async def deliver_due(self) -> int:
        """One round: claim due deliveries and attempt each (concurrently); return how many."""
        claims = await self._repository.claim_callbacks(CLAIM_BATCH, self._lock_s)
        outcomes = await asyncio.gather(
            *(self._attempt(claim) for claim in claims), return_exceptions=True
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for error in errors[1:]:
            logger.error("a callback attempt failed", exc_info=error)
        if errors:
            raise errors[0]  # the round fails (the supervisor logs it); the rest is logged
        return len(claims)

    async def _attempt(self, claim: CallbackClaim) -> None:
        job = await self._repository.get_job(claim.job_id)
        if job is None:  # deleted meanwhile: nothing left to report
            await self._repository.record_callback_attempt(
                claim, "failed", 0, {"at": _now_iso(), "error": "the job no longer exists"}
            )
            return
        body = json.dumps(callback_payload(job), separators=(",", ":"), default=str)
        headers = self._signer.headers(claim.webhook_id, body, datetime.now(UTC))
        started = time.monotonic()
        record: dict[str, Any] = {"at": _now_iso(), "attempt": claim.attempt}
        delivered = False
        try:
            # httpx's timeout caps each phase; a receiver that trickles bytes is capped here.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.post(self._url, content=body, headers=headers)
            record["status_code"] = response.status_code
            delivered = response.is_success
        except httpx.HTTPError as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        except TimeoutError:
            record["error"] = f"no complete answer within {self._timeout_s:g}s"
        record["duration_s"] = round(time.monotonic() - started, 4)
        if delivered:
            outcome, retry_in = "delivered", 0.0
        elif claim.attempt >= self._retry.max_attempts:
            outcome, retry_in = "failed", 0.0
            logger.warning(
                "callback %s given up after %d attempts", claim.webhook_id, claim.attempt
            )
        else:
            outcome, retry_in = "pending", self._retry.delay_s(claim.attempt)
        await self._repository.record_callback_attempt(claim, outcome, retry_in, record)
        self._metrics.callback_delivery("retrying" if outcome == "pending" else outcome)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def deliverer_from_settings(
    repository: JobRepository, settings: Settings, metrics: Metrics = NO_METRICS
) -> CallbackDeliverer | None:
    """The deliverer, or None when no callback URL is configured."""
    if settings.callback_url is None or settings.callback_secret is None:
        return None
    return CallbackDeliverer(
        repository,
        settings.callback_url,
        CallbackSigner.from_setting(settings.callback_secret.get_secret_value()),
        RetryPolicy(
            settings.callback_max_attempts,
            settings.callback_retry_base_s,
            settings.callback_retry_max_s,
        ),
        timeout_s=settings.callback_timeout_s,
        poll_interval_s=settings.callback_poll_interval_s,
        statement_bound_s=settings.db_command_timeout_s + settings.db_acquire_timeout_s,
        metrics=metrics,
    )
