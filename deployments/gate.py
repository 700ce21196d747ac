"""Who may call the HTTP API and how many calls run at once: API keys and admission control."""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import Iterator

from .errors import Overloaded, Unauthorized
from .settings import RouterSettings


class Gate:
    def __init__(self, settings: RouterSettings) -> None:
        keys = list(settings.api_keys)
        if settings.api_key_env and os.environ.get(settings.api_key_env):
            keys.append(os.environ[settings.api_key_env])
        self._keys = [key.encode() for key in keys if key]
        self.max_inflight = settings.max_inflight
        self.retry_after = str(settings.retry_after_s)
        self.inflight = 0

    def authorize(self, authorization: str) -> None:
        """With API keys configured, every /v1 route needs ``Authorization: Bearer <key>``."""
        if not self._keys:
            return
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, key) for key in self._keys):
            raise Unauthorized(
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Past ``max_inflight`` requests in progress: 503 with Retry-After at once, instead of
        queueing without bound (and with a JSON body, unlike the proxy's own backpressure)."""
        if self.inflight >= self.max_inflight:
            raise Overloaded(
                "the service is at capacity; retry later", headers={"Retry-After": self.retry_after}
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
