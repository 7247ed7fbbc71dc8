"""Typed errors. Each carries its HTTP status and error code; the ingress maps them in one place."""

from __future__ import annotations

from typing import Any


class OurVidzError(Exception):
    """Base of every error this service raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(OurVidzError):
    status_code = 422
    code = "invalid_request"


class Unauthorized(OurVidzError):
    status_code = 401
    code = "unauthorized"


class Forbidden(OurVidzError):
    status_code = 403
    code = "forbidden"


class NotFound(OurVidzError):
    status_code = 404
    code = "not_found"


class Conflict(OurVidzError):
    status_code = 409
    code = "conflict"


class ServiceUnavailable(OurVidzError):
    status_code = 503
    code = "unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """PostgreSQL cannot be reached (down, restarting, refusing connections)."""

    code = "database_unavailable"


class StorageError(OurVidzError):
    status_code = 502
    code = "storage_error"


class ObjectNotFound(NotFound):
    code = "object_not_found"


class ModelLoadError(OurVidzError):
    """A model could not be built or loaded (e.g. missing weights in the ``weights`` profile)."""

    code = "model_load_error"
