"""The service's errors: one table from the library's item ``Reason`` to an HTTP status, and the
request-level errors, each answered as ``{"error": {"type", "message", "index"}}``.

As TEI maps its error enum to status codes, every ``Reason`` has exactly one row here (a test checks
it), so no reason is ever answered by guesswork or by its name.
"""

from __future__ import annotations

from typing import NamedTuple

from starlette.responses import JSONResponse

from audioclip.errors import InvalidInputError, Reason


class Status(NamedTuple):
    code: int
    type: str  # the JSON body's error.type


_UNPROCESSABLE = 422
_TOO_LARGE = Status(413, "payload_too_large")

ITEM_ERRORS: dict[Reason, Status] = {
    Reason.UNSUPPORTED_TYPE: Status(_UNPROCESSABLE, "unsupported_type"),
    Reason.NOT_A_STRING: Status(_UNPROCESSABLE, "not_a_string"),
    Reason.NOT_BASE64: Status(_UNPROCESSABLE, "not_base64"),
    Reason.BAD_ITEM: Status(_UNPROCESSABLE, "bad_item"),
    Reason.BAD_SHAPE: Status(_UNPROCESSABLE, "bad_shape"),
    Reason.BAD_DTYPE: Status(_UNPROCESSABLE, "bad_dtype"),
    Reason.BAD_RANGE: Status(_UNPROCESSABLE, "bad_range"),
    Reason.NOT_FINITE: Status(_UNPROCESSABLE, "not_finite"),
    Reason.EMPTY: Status(_UNPROCESSABLE, "empty"),
    Reason.UNDECODABLE: Status(_UNPROCESSABLE, "undecodable"),
    Reason.NOT_FOUND: Status(_UNPROCESSABLE, "not_found"),
    Reason.BAD_SAMPLE_RATE: Status(_UNPROCESSABLE, "bad_sample_rate"),
    Reason.MISSING_SAMPLE_RATE: Status(_UNPROCESSABLE, "missing_sample_rate"),
    Reason.SAMPLE_RATE_MISMATCH: Status(_UNPROCESSABLE, "sample_rate_mismatch"),
    Reason.TOO_MANY_CHANNELS: Status(_UNPROCESSABLE, "too_many_channels"),
    Reason.BAD_WINDOW: Status(400, "bad_window"),
    Reason.TEXT_TOO_LONG: Status(_UNPROCESSABLE, "text_too_long"),  # fixable by the caller: truncate
    Reason.TEXT_TOO_MANY_CHARS: _TOO_LARGE,
    Reason.TOO_MANY_PIXELS: _TOO_LARGE,
    Reason.AUDIO_TOO_LONG: _TOO_LARGE,
    Reason.TOO_MANY_ITEMS: _TOO_LARGE,
    Reason.TOO_MANY_WINDOWS: _TOO_LARGE,
    Reason.TOWER_NOT_SERVED: Status(400, "tower_not_served"),
}


class ServiceError(Exception):
    """An error answered with ``status`` and the JSON body; never carries a traceback or a path."""

    status = 400
    type = "bad_request"

    def __init__(self, message: str, *, index: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.index = index
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "index": self.index}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BadRequest(ServiceError):
    status, type = 400, "bad_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class ModelNotFound(ServiceError):
    status, type = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class Overloaded(ServiceError):
    status, type = 503, "overloaded"


class Unavailable(ServiceError):
    status, type = 503, "unavailable"


class InternalError(ServiceError):
    """Our fault, not the client's: answered without details (the server log has the traceback)."""

    status, type = 500, "internal_error"

    def __init__(self) -> None:
        super().__init__("internal error; see the server log")


class ItemError(ServiceError):
    """A library ``InvalidInputError``, answered by its row in ``ITEM_ERRORS``."""

    def __init__(self, err: InvalidInputError) -> None:
        super().__init__(str(err), index=err.index)
        self.reason = err.reason
        self.status, self.type = ITEM_ERRORS[err.reason]


# Every status the service answers with, for the OpenAPI description of each route.
ERROR_STATUSES = {
    400: "malformed body, unknown field, bad query parameter or a tower this deployment does not serve",
    401: "missing or invalid API key (when keys are configured)",
    404: "unknown route or model",
    413: "too many items, bytes, pixels, characters or seconds of audio",
    415: "content type not accepted by this route",
    422: "an item that cannot be used (the error names its index and reason)",
    503: "at capacity or a replica restarting: retry after Retry-After seconds",
}
