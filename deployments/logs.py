"""Quiet logs for a client's mistakes: operators alert on ERROR lines, and bad input is not theirs.

Serve logs every exception a replica method raises as ``Request failed.`` at ERROR with its
traceback. The handle API raises ``InvalidInputError`` for bad input by contract, so in our
replicas that record becomes one INFO line with the reason (Serve's format names the request);
every other failure keeps its level and traceback. The access-log line Serve writes next for that
call says ``REFUSED`` instead of ``ERROR`` (Serve's request metrics still count it, labelled with
the exception type ``InvalidInputError``).
"""

from __future__ import annotations

import contextvars
import logging

from audioclip.errors import InvalidInputError

SERVE_LOGGER = "ray.serve"


# Set while Serve finishes a call that failed on the client's input: its access-log line follows
# in the same context.
_refused = contextvars.ContextVar("audioclip_refused", default=False)


class ClientErrorsAtInfo(logging.Filter):
    """Rewrites a failed call's records whose exception is the client's input error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, InvalidInputError):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg = "refused: %s (%s)"  # Serve's format adds the request id
            record.args = (error, error.reason.value)
            record.exc_info = record.exc_text = record.stack_info = None
            _refused.set(True)
        elif _refused.get() and isinstance(record.msg, str) and " ERROR " in record.msg:
            record.msg = record.msg.replace(" ERROR ", " REFUSED ", 1)  # "CALL embed ERROR 5.1ms"
            _refused.set(False)
        return True


def quiet_client_errors() -> None:
    """Install the filter on Serve's logger once per process (a replica's constructor calls it)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientErrorsAtInfo) for f in logger.filters):
        logger.addFilter(ClientErrorsAtInfo())
