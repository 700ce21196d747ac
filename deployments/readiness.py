"""What is up, from Serve's controller: the live replica count of each tower, refreshed in the
background, so ``/readyz`` answers at once whatever the towers are doing (a probe that waited on a
replica still loading would time out, and leave a cancelled call behind)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from ray import serve

logger = logging.getLogger("ray.serve")


class TowerWatch:
    def __init__(self, app_name: str, deployments: Mapping[str, str], interval_s: float = 0.5) -> None:
        self.app_name = app_name
        self.deployments = dict(deployments)  # tower -> deployment name
        self.interval_s = interval_s
        self.running: dict[str, int] = dict.fromkeys(self.deployments, 0)
        self.checked_at = 0.0  # monotonic time of the last answer from the controller
        self._task: asyncio.Task | None = None
        self._failing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="tower-watch")

    @property
    def ready(self) -> bool:
        """Every tower has a running replica, as the controller said within a few intervals."""
        fresh = time.monotonic() - self.checked_at < 10 * self.interval_s + 5.0
        return fresh and all(count > 0 for count in self.running.values())

    def not_ready(self) -> list[str]:
        return [tower for tower, count in self.running.items() if count == 0]

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
            try:
                self.running = await asyncio.to_thread(self._read)
                self.checked_at = time.monotonic()
                self._failing = False
            except Exception:  # keep watching; the state goes stale, and so not ready
                if not self._failing:
                    logger.warning("cannot read the towers' state from Serve's controller", exc_info=True)
                self._failing = True
            await asyncio.sleep(self.interval_s)
