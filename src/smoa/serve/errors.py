"""API errors of the server, in the OpenAI error shape, and the mapping of smoa's own errors onto them.

::

    APIError (SmoaError)                 status  type
    ├── AuthenticationError                 401  authentication_error   no or wrong key
    ├── PermissionDeniedError               403  permission_error       inference key on an admin endpoint
    ├── NotFoundError                       404  not_found_error        unknown adapter / model
    ├── BadRequestError                     400  invalid_request_error  a field is wrong (``param`` names it)
    ├── PayloadTooLargeError                413  invalid_request_error  body or upload over its cap
    ├── RateLimitError                      429  rate_limit_error       queue full (``retry_after`` seconds)
    └── ServiceUnavailableError             503  service_unavailable    not ready yet, or draining

The serving layer raises these (no HTTP types); the routers turn them into responses.
"""

from __future__ import annotations

from typing import Any

from smoa.errors import (
    AdapterNotFoundError,
    CompositionError,
    ConfigError,
    InvalidAdapterError,
    InvalidInputError,
    SmoaError,
    UnsafeAdapterFileError,
)

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "as_api_error",
]


class APIError(SmoaError):
    """An error with an HTTP status and the OpenAI error fields."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class AuthenticationError(APIError):
    status, type = 401, "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PermissionDeniedError(APIError):
    status, type = 403, "permission_error"


class NotFoundError(APIError):
    status, type = 404, "not_found_error"


class BadRequestError(APIError):
    status, type = 400, "invalid_request_error"


class PayloadTooLargeError(APIError):
    status, type = 413, "invalid_request_error"


class RateLimitError(APIError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailableError(APIError):
    status, type = 503, "service_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def as_api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The :class:`APIError` for any exception (smoa's own errors keep their message; others become 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return NotFoundError(str(exc), param=param, code="adapter_not_found")
    if isinstance(exc, (UnsafeAdapterFileError, InvalidAdapterError, CompositionError, InvalidInputError,
                        ConfigError)):  # fmt: skip
        return BadRequestError(str(exc), param=param)
    if isinstance(exc, SmoaError):
        return BadRequestError(str(exc), param=param)
    err = APIError(f"internal error: {type(exc).__name__}")
    return err
