"""Errors the portal's services raise; each carries the HTTP status it maps to."""

from __future__ import annotations


class PortalError(Exception):
    """A request the portal refuses; ``str(error)`` is the message shown to the caller."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(PortalError):
    """Missing or inconsistent request metadata (e.g. a wrong checksum)."""

    status_code = 400


class NotAuthenticatedError(PortalError):
    """No valid credential was presented."""

    status_code = 401


class ForbiddenError(PortalError):
    """The caller is known but may not do this."""

    status_code = 403


class NotFoundError(PortalError):
    """The resource does not exist."""

    status_code = 404


class ConflictError(PortalError):
    """The resource is in a state that does not allow this (closed round, ...)."""

    status_code = 409


class TooLargeError(PortalError):
    """The upload exceeds the configured size limit."""

    status_code = 413


class InvalidContentError(PortalError):
    """The submitted content is malformed or does not match the federation."""

    status_code = 422


class RateLimitedError(PortalError):
    """Too many failed attempts; try again later."""

    status_code = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
