"""Helpers for the tests that run a real local Ray cluster with the app deployed."""

from __future__ import annotations

import os
import re
from pathlib import Path

from audioclip_serve.bench.serveapp import free_port, wait_ready

__all__ = ["ALARMS", "ENV_KEY_VAR", "TEST_ARGS", "LogWatch", "free_port", "wait_ready"]

# What must never appear in a replica's log for a client's mistake.
ALARMS = re.compile(r"\bERROR\b|Traceback|CRITICAL|exception was never retrieved")

# An API key that only the environment carries, for the router's ``api_key_env``: set before any
# test starts its Ray cluster, so every replica (a child of that cluster) inherits it.
ENV_KEY_VAR = "AUDIOCLIP_TEST_API_KEY"
os.environ.setdefault(ENV_KEY_VAR, "key-from-the-environment")

TEST_ARGS = {
    "checkpoint": "synthetic:shared",  # the golden weights, so served == in-process model
    "model_name": "audioclip-test",
    "image": {"num_cpus": 0, "max_batch_size": 16, "batch_wait_timeout_s": 0.02},
    "text": {"num_cpus": 0, "max_batch_size": 32, "batch_wait_timeout_s": 0.05},
    "audio": {"num_cpus": 0, "max_batch_size": 8, "batch_wait_timeout_s": 0.02},
    "router": {"num_cpus": 0, "max_queued_requests": 256},
    "limits": {
        "max_items": 64,
        "max_body_bytes": 8 * 1024 * 1024,
        "max_pixels": 20_000_000,
        "max_audio_seconds": 60.0,
        "max_text_chars": 5000,
        "max_windows": 32,
        "max_windowed_audio_seconds": 120.0,
    },
}


class LogWatch:
    """New lines in the cluster's log files (Serve's replica logs, workers' stdout and stderr)."""

    def __init__(self) -> None:
        import ray

        self.root = Path(ray._private.worker._global_node.get_logs_dir_path())
        self.offsets = {path: path.stat().st_size for path in self._files()}

    def _files(self) -> list[Path]:
        return [
            *self.root.glob("serve/*.log"),
            *self.root.glob("worker-*.out"),
            *self.root.glob("worker-*.err"),
        ]

    def new_lines(self) -> list[str]:
        lines = []
        for path in self._files():
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                lines += f.read().decode(errors="replace").splitlines()
        return lines


def namespaces_available() -> bool:
    """Whether this machine lets a test make hosts (root, iproute2, network namespaces)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = "ac-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=30).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return made


def kill_cluster(gcs_address: str, gcs_port: int) -> None:
    """Every process of one ``ray start`` cluster and only those (``ray stop`` would end every Ray
    cluster on the machine): the ones naming its GCS address or port, and all their descendants
    (workers and agents retitle themselves ``ray::...``, so they are found through their parents)."""
    import contextlib
    from pathlib import Path

    marks = (gcs_address.encode(), f"--gcs_server_port={gcs_port}".encode())
    parents, roots = {}, []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            command = (proc / "cmdline").read_bytes()
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if any(mark in command for mark in marks):
            roots.append(int(proc.name))
    doomed, todo = set(roots), list(roots)
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in doomed:
                doomed.add(pid)
                todo.append(pid)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    # `ray start` named this cluster the machine's current one; `ray stop` would forget it, and a
    # later plain `ray.init()` or `serve run` (make demo) would otherwise wait for it forever.
    current = Path("/tmp/ray/ray_current_cluster")
    with contextlib.suppress(OSError):
        if current.read_text().strip() == gcs_address:
            current.unlink()
