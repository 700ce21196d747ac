"""``serve run`` of a config on a free port, on a lean Ray head of its own (``local_head``): readiness,
fail-fast, log tail and cleanup."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from audioclip_serve.local_head import LocalHead, free_port, serve_run_command, stop_serve_run

from .common import ROOT, log

__all__ = ["ServeApp", "free_port", "wait_ready", "write_config"]


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


class ServeApp:
    """``serve run`` of a temp copy of a config on a free port; stopped by SIGINT (serve shutdown),
    then any leftover process of its cluster is ended by pid."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        ready_timeout_s: float,
        env: dict[str, str] | None = None,
        lean_head: bool = True,
    ) -> None:
        self.extra_env = env or {}  # a lever under test, for the app's processes only (not this driver)
        self.lean_head = lean_head
        self.port, grpc_port = free_port(), free_port()
        self.config, has_grpc = write_config(config, self.port, workdir, grpc_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}" if has_grpc else None
        self.log_path = workdir / "serve_run.log"
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.head: LocalHead | None = None
        self.ready_s = 0.0

    def start(self) -> None:
        # A cluster of its own, as `make demo` runs it (audioclip_serve.local_head): a lean head on
        # free ports, so it neither joins nor disturbs another cluster on the machine.
        self.head = LocalHead(self.env(), self.log_path.with_name("ray_head.log"), lean=self.lean_head)
        try:
            self._launch()
        except BaseException:  # a failed start or an interrupt (Ctrl-C, a test's timeout): no cluster left
            log(self.log_tail())
            self.stop()
            raise
        log(f"app ready at {self.url} after {self.ready_s:.0f} s")

    def _launch(self) -> None:
        """The head, then `serve run` on it, until /readyz answers."""
        self.head.start()
        command = serve_run_command(self.head.address, self.config)
        log(f"starting: {' '.join(command)} (log: {self.log_path})")
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.head.env
            )
        self.ready_s = wait_ready(self.url, self.ready_timeout_s, self.proc)

    def env(self) -> dict[str, str]:
        """This process's environment, with the project importable for the replicas and the lever
        under test over it; the head adds the serving environment ``make demo`` uses
        (``local_head.SERVING_ENV``) where these do not set its variables."""
        env = {**os.environ, **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def gcs_address(self) -> str | None:
        return self.head.address if self.head is not None else None

    def root_pids(self) -> list[int]:
        """``serve run`` and the head: every process of the app descends from one of them."""
        return [p.pid for p in (self.proc, self.head and self.head.proc) if p is not None]

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGINT to ``serve run`` (it shuts Serve down), then the head and whatever is left of it."""
        if self.proc is not None:
            log("stopping serve run (SIGINT: serve shutdown), then its Ray head")
            stop_serve_run(self.proc)
            self.proc = None
        if self.head is not None:
            self.head.stop()
            self.head = None
