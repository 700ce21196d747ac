"""``serve run`` of a config on a free port: readiness, fail-fast, log tail and cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from .common import ROOT, log
from .meter import descendants, gcs_address, start_time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(source: Path, port: int, directory: Path, grpc_port: int) -> tuple[Path, bool]:
    """A copy of the serve config with the HTTP port and, where it has ``grpc_options``, the gRPC
    port replaced; and whether it has them."""

    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {})["port"] = port
    config["http_options"].setdefault("host", "127.0.0.1")
    has_grpc = "grpc_options" in config
    if has_grpc:
        config["grpc_options"]["port"] = grpc_port
    path = directory / source.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, has_grpc


def http_status(url: str, timeout: float = 10.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError):
        return None


def wait_ready(url: str, timeout_s: float = 240.0, proc: subprocess.Popen | None = None) -> float:
    """Seconds until ``GET {url}/readyz`` answers 200; with ``proc`` (the ``serve run`` process), fails
    early if it exits. Raises ``TimeoutError`` after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve run exited with code {proc.returncode} before the app was ready")
        if http_status(f"{url}/readyz") == 200:
            return time.monotonic() - started
        time.sleep(1.0)
    raise TimeoutError(f"{url}/readyz not 200 after {timeout_s:.0f} s")


# What `make demo` sets too (Makefile, DEMO_ENV): HAProxy as the HTTP ingress, forwarding straight to
# the router replicas (Serve's direct ingress) instead of through Serve's Python proxy: queries at
# concurrency 32 2.5x the items/s, proxy + router CPU 16.4 -> 3.0 ms per request (docs/BENCHMARKS.md).
# Set RAY_SERVE_ENABLE_HA_PROXY=0 to run Serve's own proxy.
# Serve's throughput mode (its replica code on the replica's own loop, gRPC between deployments): the
# router's CPU per query at concurrency 1 9.1-11.0 -> 6.7-7.6 ms; its gRPC calls need the replicas'
# 4 MiB receive limit raised (windowed audio sends more). A driver process that sets it must make its
# handle calls from an event loop, so it is set for `serve run` and its cluster only.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2147483647",
}


class ServeApp:
    """``serve run`` of a temp copy of a config on a free port; stopped by SIGINT (serve shutdown),
    then any leftover process of its cluster is ended by pid."""

    def __init__(
        self, config: Path, workdir: Path, ready_timeout_s: float, env: dict[str, str] | None = None
    ) -> None:
        self.extra_env = env or {}  # a lever under test, for the app's processes only (not this driver)
        self.port, grpc_port = free_port(), free_port()
        self.config, has_grpc = write_config(config, self.port, workdir, grpc_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}" if has_grpc else None
        self.log_path = workdir / "serve_run.log"
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready_s = 0.0

    def start(self) -> None:
        serve_cli = Path(sys.executable).with_name("serve")
        if serve_cli.exists():
            command = [str(serve_cli), "run"]
        else:  # ray installed without its scripts next to this interpreter (e.g. pip --target)
            entry = "import sys; from ray.serve.scripts import cli; sys.argv[0] = 'serve'; cli()"
            command = [sys.executable, "-c", entry, "run"]
        # A cluster of its own: without ``--address local`` Ray joins the last ``ray start`` cluster
        # named in /tmp/ray/ray_current_cluster, which a killed run leaves behind pointing at nothing.
        command += ["--address", "local", str(self.config)]
        log(f"starting: {' '.join(command)} (log: {self.log_path})")
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env()
            )
        try:
            self.ready_s = wait_ready(self.url, self.ready_timeout_s, self.proc)
        except Exception:
            log(self.log_tail())
            self.stop()
            raise
        log(f"app ready at {self.url} after {self.ready_s:.0f} s")

    def env(self) -> dict[str, str]:
        """This process's environment, with the project importable for the replicas, the serving
        environment ``make demo`` uses (``SERVE_ENV``) where this one does not set those variables,
        and the lever under test over both."""
        env = {**SERVE_ENV, **os.environ, **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def gcs_address(self) -> str | None:
        return gcs_address(descendants(self.proc.pid)) if self.proc else None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        family = {pid: start_time(pid) for pid in descendants(self.proc.pid)}
        if self.proc.poll() is None:
            log("stopping serve run (SIGINT: serve shutdown, then its local Ray cluster)")
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(2.0)
        for pid, started in family.items():  # processes of our cluster that outlived the driver
            if started is not None and start_time(pid) == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None
