"""What is up, from Serve's controller: the live replica count of each tower, kept in the background,
so ``/readyz`` answers at once whatever the towers are doing (a probe that waited on a replica still
loading would time out, and leave a cancelled call behind).

Asking the controller costs CPU in this router and in the controller: two benchmark runs of the
same code minutes apart, polling twice a second and then as below, gave 61 and 20 ms of router CPU
per single-query request, and 288 and 42 ms per 32-text request (docs/BENCHMARKS.md). So the state
is refreshed every ``idle_s`` once everything is up, every ``starting_s`` while something is not,
and when a probe or ``/v1/models`` finds it older than ``fresh_s`` (without waiting for it). Each read
takes the controller's details as the plain dict of Serve's REST schema (``running_replicas``): 0.45 ms
of this process's CPU, where ``serve.status()`` spends 40-43 ms validating the same dict into
pydantic models before it counts the replicas (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

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

    async def _watch(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.running = await asyncio.to_thread(running_replicas, self.app_name, self.deployments)
                self.checked_at = time.monotonic()
                self._failing = False
            except Exception:  # keep watching; the state goes stale, and so not ready
                if not self._failing:
                    logger.warning("cannot read the towers' state from Serve's controller", exc_info=True)
                self._failing = True
            wait = self.idle_s if not self.not_ready() else self.starting_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)


def running_replicas(app_name: str, deployments: Mapping[str, str]) -> dict[str, int]:
    """Tower -> replicas in state RUNNING (0 for a deployment or an app the controller does not have),
    from the controller's details as a dict in Serve's REST schema, which ``serve.status()`` parses
    into models first. Serve has no public call that returns it unparsed, so this takes its
    client's; a Ray without that call is read through ``serve.status()``."""
    try:
        from ray.serve.context import _get_global_client

        read_details = _get_global_client().get_serve_details
    except (ImportError, AttributeError):
        return _running_from_status(app_name, deployments)
    app = (read_details().get("applications") or {}).get(app_name) or {}
    found = app.get("deployments") or {}
    return {
        tower: sum(_state(r) == "RUNNING" for r in (found.get(name) or {}).get("replicas") or ())
        for tower, name in deployments.items()
    }


def _state(replica: Mapping[str, Any]) -> str:
    state = replica.get("state")  # a ReplicaState (a str enum) or, over JSON, its value
    return str(getattr(state, "value", state))


def _running_from_status(app_name: str, deployments: Mapping[str, str]) -> dict[str, int]:
    app = serve.status().applications.get(app_name)
    found = app.deployments if app else {}
    return {t: found[n].replica_states.get("RUNNING", 0) if n in found else 0 for t, n in deployments.items()}
