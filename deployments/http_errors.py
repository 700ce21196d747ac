"""HTTP errors with the service's JSON body: ``{"error": {"type", "message", "index"}}``."""

from __future__ import annotations

from starlette.responses import JSONResponse

from audioclip.errors import InvalidInputError


class ServiceError(Exception):
    """An error answered with ``status`` and a JSON body; never carries a traceback or a path."""

    status = 400
    type = "bad_request"

    def __init__(self, message: str, *, index: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.index = index
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"type": self.type, "message": self.message, "index": self.index}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class BadRequest(ServiceError):
    status, type = 400, "bad_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class Unprocessable(ServiceError):
    status, type = 422, "invalid_item"


class Overloaded(ServiceError):
    status, type = 503, "overloaded"


class Unavailable(ServiceError):
    status, type = 503, "unavailable"


# Item problems whose cause is a limit, not the item's content.
_TOO_LARGE_REASONS = {"too_many_pixels", "too_long"}


def from_invalid_input(err: InvalidInputError) -> ServiceError:
    """Map a library input error to 413 (a limit) or 422 (an item that cannot be used)."""
    cls = PayloadTooLarge if err.reason in _TOO_LARGE_REASONS else Unprocessable
    out = cls(str(err), index=err.index)
    out.type = err.reason if cls is Unprocessable else cls.type
    return out
