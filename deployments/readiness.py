"""What is up, from Serve's controller: the live replica count of each tower, kept in the background,
so ``/readyz`` answers at once whatever the towers are doing (a probe that waited on a replica still
loading would time out, and leave a cancelled call behind).

Asking the controller costs CPU in this router and in the controller: two benchmark runs of the
same code minutes apart, polling twice a second and then as below, gave 61 and 20 ms of router CPU
per single-query request, and 288 and 42 ms per 32-text request (docs/BENCHMARKS.md). So the state
is refreshed every ``idle_s`` once everything is up, every ``starting_s`` while something is not,
and when a probe or ``/v1/models`` finds it older than ``fresh_s`` (without waiting for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence

from ray import serve

logger = logging.getLogger("ray.serve")


class TowerWatch:
    """``can_sleep``: towers that autoscale to zero; with no replica they are not "down" (the next
    request starts one), and readiness says they are scaled to zero."""

    def __init__(
        self,
        app_name: str,
        deployments: Mapping[str, str],
        can_sleep: Sequence[str] = (),
        starting_s: float = 0.5,
        idle_s: float = 10.0,
        fresh_s: float = 1.0,
    ) -> None:
        self.app_name = app_name
        self.deployments = dict(deployments)  # tower -> deployment name
        self.can_sleep = frozenset(can_sleep)
        self.starting_s, self.idle_s, self.fresh_s = starting_s, idle_s, fresh_s
        self.running: dict[str, int] = dict.fromkeys(self.deployments, 0)
        self.checked_at = 0.0  # monotonic time of the last answer from the controller
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._failing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="tower-watch")

    def touch(self) -> None:
        """A reader wants a recent state: refresh soon if it is older than ``fresh_s``."""
        if time.monotonic() - self.checked_at > self.fresh_s:
            self._wake.set()

    @property
    def ready(self) -> bool:
        """Every tower has a running replica or may sleep, as the controller said recently."""
        fresh = time.monotonic() - self.checked_at < 2 * self.idle_s + 5.0
        return fresh and not self.not_ready()

    def not_ready(self) -> list[str]:
        return [t for t, count in self.running.items() if count == 0 and t not in self.can_sleep]

    def asleep(self) -> list[str]:
        return [t for t, count in self.running.items() if count == 0 and t in self.can_sleep]

    def _read(self) -> dict[str, int]:
        app = serve.status().applications.get(self.app_name)
        if app is None:
            return dict.fromkeys(self.deployments, 0)
        out = {}
        for tower, name in self.deployments.items():
            deployment = app.deployments.get(name)
            out[tower] = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        return out

    async def _watch(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.running = await asyncio.to_thread(self._read)
                self.checked_at = time.monotonic()
                self._failing = False
            except Exception:  # keep watching; the state goes stale, and so not ready
                if not self._failing:
                    logger.warning("cannot read the towers' state from Serve's controller", exc_info=True)
                self._failing = True
            wait = self.idle_s if not self.not_ready() else self.starting_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
