"""Typed errors. Each carries its HTTP status and error code; the ingress maps them in one place."""

from __future__ import annotations

from typing import Any


class OurVidzError(Exception):
    """Base of every error this service raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.param = param
        """The request field at fault, where one is (OpenAI's ``error.param``)."""


class InvalidRequest(OurVidzError):
    status_code = 422
    code = "invalid_request"


class PromptRefused(InvalidRequest):
    """The prompt policy refused a prompt. The message names the rule, never the matched text."""

    code = "prompt_refused"


class ImageRejected(InvalidRequest):
    """An uploaded or fetched reference is not an acceptable image."""

    code = "invalid_image"


class LoraRejected(InvalidRequest):
    """An uploaded LoRA is not one this service can load (format, tensor names, rank, size)."""

    code = "invalid_lora"


class UrlRefused(InvalidRequest):
    """A reference URL may not be fetched (scheme, address, redirect, size or time)."""

    code = "reference_url_refused"


class PayloadTooLarge(OurVidzError):
    status_code = 413
    code = "payload_too_large"


class RateLimited(OurVidzError):
    """Too many requests or queued jobs; ``retry_after_s`` becomes the ``Retry-After`` header."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s


class TooManyQueuedJobs(RateLimited):
    code = "too_many_queued_jobs"


class TooManyWaitingRequests(RateLimited):
    """An ingress replica holds as many waiting image requests (OpenAI routes) as allowed."""

    code = "too_many_waiting_requests"


class QuotaExhausted(RateLimited):
    """The user's GPU-time budget for the window cannot cover the job."""

    code = "quota_exhausted"


class Unauthorized(OurVidzError):
    status_code = 401
    code = "unauthorized"


class Forbidden(OurVidzError):
    status_code = 403
    code = "forbidden"


class NotFound(OurVidzError):
    status_code = 404
    code = "not_found"


class Gone(OurVidzError):
    """The resource existed and was removed on purpose (retention deleted a job's files)."""

    status_code = 410
    code = "expired"


class Conflict(OurVidzError):
    status_code = 409
    code = "conflict"


class ServiceUnavailable(OurVidzError):
    status_code = 503
    code = "unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """PostgreSQL cannot be reached (down, restarting, refusing connections)."""

    code = "database_unavailable"


class ClassifierUnavailable(ServiceUnavailable):
    """The external prompt classifier failed; the prompt is refused until it answers."""

    code = "prompt_classifier_unavailable"


class StorageError(OurVidzError):
    status_code = 502
    code = "storage_error"


class GenerationTimeout(OurVidzError):
    """A request that waits for its job (the OpenAI image routes) ran out of time; the job
    goes on, and ``details`` names it."""

    status_code = 504
    code = "generation_timeout"


class GenerationFailed(OurVidzError):
    """The job a waiting request submitted failed (or was cancelled)."""

    status_code = 500
    code = "generation_failed"


class ObjectNotFound(NotFound):
    code = "object_not_found"


class ModelLoadError(OurVidzError):
    """A model could not be built or loaded (e.g. missing weights in the ``weights`` profile)."""

    code = "model_load_error"
