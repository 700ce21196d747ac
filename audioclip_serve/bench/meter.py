"""Process CPU metering from /proc (by role) and the towers' batch statistics."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from audioclip_serve.procfs import cmdline, descendants, read_stat

from .common import APP, log


def role_of(pid: int, client_pids: set[int], ours: set[int] | None) -> str:
    """Which part of the system a process is: a Serve deployment, the proxy, the load client, ...;
    ``ours``: the processes of the cluster we started (others are "other", e.g. another job)."""
    if pid in client_pids:
        return "load client"
    if pid == os.getpid():
        return "bench driver"
    if ours is not None and pid not in ours:
        return "other"
    line = cmdline(pid)
    match = re.search(r"ServeReplica:[^:\s]+:(\w+)", line)
    if match:
        return match.group(1)
    if "ProxyActor" in line or os.path.basename(line.split(" ", 1)[0]) == "haproxy":
        return "proxy"  # Serve's Python proxy, or the HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1)
    if "ServeController" in line:
        return "controller"
    if ours is not None or "ray" in line:
        return "ray system"
    return "other"


def cpu_by_pid() -> dict[int, float]:
    """utime + stime (s) of every process on the machine."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                out[int(entry.name)] = stat[1]
    return out


def cores_elsewhere(before: dict[int, float], after: dict[int, float], wall_s: float) -> float:
    """Cores that processes other than this one kept busy over ``wall_s``."""
    me = os.getpid()
    return sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid != me) / wall_s


# Roles of ``role_of`` that are not part of the cluster serving the app, and Ray's own processes.
OUTSIDE_CLUSTER = ("load client", "bench driver", "other")
RAY_SYSTEM = ("controller", "ray system")
OTHER_RAY = "other Ray"
LEADING_ROLES = ("proxy", "Router")  # a request's way in, before the towers


def cpu_ms_per_request(cores: dict[str, float], wall_s: float, requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request in each process role of the cluster serving it (cores
    busy x ``wall_s`` x 1000 / ``requests``; ``cores`` as ``CpuMeter.usage`` gives them): the proxy,
    each deployment's replicas (the router, each tower, the weight store) and, as ``other Ray``, the
    controller and Ray's own processes; ``total`` is their sum. The load client, the bench driver and
    processes outside the cluster are left out. Empty when nothing was answered."""
    if requests <= 0 or wall_s <= 0:
        return {}
    by_role: Counter = Counter()
    for role, busy in cores.items():
        if role != "total" and role not in OUTSIDE_CLUSTER:
            by_role[OTHER_RAY if role in RAY_SYSTEM else role] += busy * wall_s * 1e3 / requests
    out = {role: round(ms, 3) for role, ms in sorted(by_role.items())}
    out["total"] = round(sum(by_role.values()), 3)
    return out


class CpuMeter:
    """CPU seconds of every process on the machine (utime + stime from /proc), by role. ``root_pids``:
    ``serve run`` and its Ray head, whose descendants are our cluster (None: a cluster we did not start)."""

    def __init__(self, root_pids: Sequence[int] | None) -> None:
        self.root_pids = root_pids
        self.client_pids: set[int] = set()
        self._roles: dict[int, str] = {}

    def snapshot(self) -> dict[int, float]:
        return cpu_by_pid()

    def usage(self, before: dict[int, float], after: dict[int, float], wall_s: float) -> dict[str, float]:
        """Cores busy over ``wall_s``: ``total`` and per role (processes that exited are missed)."""
        ours = {*self.root_pids, *descendants(*self.root_pids)} if self.root_pids else None
        by_role: Counter = Counter()
        for pid, seconds in after.items():
            if pid not in self._roles:
                self._roles[pid] = role_of(pid, self.client_pids, ours)
            by_role[self._roles[pid]] += seconds - before.get(pid, 0.0)
        out = {role: round(s / wall_s, 3) for role, s in sorted(by_role.items()) if s > 0}
        out["total"] = round(sum(by_role.values()) / wall_s, 3)
        return out


class TowerStats:
    """Batches the towers formed, read through a Ray driver in this process (if one connects). A
    handle call reaches one replica, so towers with several replicas report none."""

    def __init__(self, address: str | None, replicas: dict[str, int]) -> None:
        self.handles: dict[str, Any] = {}
        if address is None:
            return
        try:
            import ray
            from ray import serve

            from deployments.towers import TOWER_DEPLOYMENTS

            ray.init(address=address, namespace="serve", log_to_driver=False, logging_level="ERROR")
            for modality, deployment in TOWER_DEPLOYMENTS.items():
                if replicas.get(modality, 1) == 1:
                    self.handles[modality] = serve.get_deployment_handle(deployment.name, APP)
        except Exception as err:  # noqa: BLE001 - without stats the benchmark still runs
            log(f"no tower stats ({type(err).__name__}: {err})")

    def snapshot(self, modality: str) -> dict | None:
        handle = self.handles.get(modality)
        if handle is None:
            return None
        try:
            return handle.stats.remote().result(timeout_s=60)
        except Exception as err:  # noqa: BLE001 - a missing figure, not a failed run
            log(f"stats of the {modality} tower failed: {type(err).__name__}: {str(err)[:200]}")
            return None

    @staticmethod
    def batches_between(before: dict | None, after: dict | None) -> list[int] | None:
        """Sizes of the batches formed between two snapshots of one replica (None if unknown, e.g.
        the replica was replaced, or more were formed than it keeps)."""
        if before is None or after is None or before["pid"] != after["pid"]:
            return None
        formed = after["batches_total"] - before["batches_total"]
        if formed > len(after["batch_sizes"]):
            return None
        return after["batch_sizes"][len(after["batch_sizes"]) - formed :]

    def close(self) -> None:
        if self.handles:
            import ray

            ray.shutdown()
