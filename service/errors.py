"""The service's error tree (no web framework here): the HTTP layer maps each class to a status.

Messages are one line for the client: no file paths, host names or tracebacks.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    """Malformed input (400)."""

    status = 400


class Unauthorized(ServiceError):
    """Missing or wrong API key (401)."""

    status = 401


class Forbidden(ServiceError):
    """The key lacks the scope (403)."""

    status = 403


class NotFound(ServiceError):
    """Unknown model, version, file or job (404): the same answer whether a guessed name exists or not."""

    status = 404


class Conflict(ServiceError):
    """The request clashes with the current state, e.g. a model name already taken (409)."""

    status = 409


class RangeNotSatisfiable(ServiceError):
    """A Range header outside the file (416)."""

    status = 416


class TooLarge(ServiceError):
    """A body or part over its limit (413)."""

    status = 413


class UnsupportedFormat(ServiceError):
    """A model file of no format we accept (415)."""

    status = 415


class Unavailable(ServiceError):
    """Overloaded or not ready; the client should retry later (503 with Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageFull(ServiceError):
    """No space left to store the upload or artifact (507)."""

    status = 507
