"""A cluster of hosts with their own addresses: Ray nodes in network namespaces joined by veth pairs
and a bridge (made and removed here), towers on different hosts, weights crossing hosts through the
object store, and under load (a) a worker host's processes killed and (b) a worker host's link cut.

Needs root and iproute2 (``ip netns``); elsewhere the module skips and says so. The only addresses
used are the bridge's private /24 and loopback.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from conftest import INPUTS, row_cosines
from ray import serve
from serve_support import TEST_ARGS, free_port, kill_cluster, namespaces_available, wait_ready

import audioclip
from deployments.app import build_app

pytestmark = [pytest.mark.serve, pytest.mark.slow]
BIN = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[1] / ".venv")) / "bin"
BRIDGE, NET = "acbr0", "10.88.0"
HEAD_IP = f"{NET}.1"
HOSTS = {f"ach{i}": f"{NET}.1{i}" for i in (1, 2, 3)}  # namespace -> its address
REQUEST_TIMEOUT_S = 30  # the proxy's: no request may wait longer
# Node death is declared after a few missed health checks: sped up from Ray's defaults (3 s x 5)
# so the test does not wait, as an operator may tune them (see docs/RELIABILITY.md).
HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "4"}


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)


def _cleanup() -> None:
    for namespace in HOSTS:
        pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        _run("ip", "netns", "del", namespace, check=False)
        _run("ip", "link", "del", f"{namespace}-br", check=False)
    _run("ip", "link", "del", BRIDGE, check=False)


def _make_hosts() -> None:
    _cleanup()
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{HEAD_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    for namespace, address in HOSTS.items():
        _run("ip", "netns", "add", namespace)
        _run(
            "ip", "link", "add", f"{namespace}-br", "type", "veth", "peer", "name", "eth0", "netns", namespace
        )
        _run("ip", "link", "set", f"{namespace}-br", "master", BRIDGE, "up")
        inside = ("ip", "netns", "exec", namespace, "ip")
        _run(*inside, "addr", "add", f"{address}/24", "dev", "eth0")
        _run(*inside, "link", "set", "eth0", "up")
        _run(*inside, "link", "set", "lo", "up")


def _start_worker(namespace: str, gcs: str, env: dict) -> None:
    command = [
        "ip", "netns", "exec", namespace, str(BIN / "ray"), "start", f"--address={gcs}",
        f"--node-ip-address={HOSTS[namespace]}", "--num-cpus=1", '--resources={"worker": 1}',
        "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=180)


@dataclass
class MultiHost:
    url: str
    gcs: str
    env: dict
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> namespace (or "head")

    def host_of(self, deployment: str) -> str:
        node = serve.get_deployment_handle(deployment, "audioclip").describe.remote().result(timeout_s=60)
        return self.nodes.get(node["node_id"], "?")

    def store_host(self) -> str:
        info = serve.get_deployment_handle("WeightStore", "audioclip").info.remote().result(timeout_s=60)
        return self.nodes.get(info["node_id"], "?")

    def refresh_nodes(self) -> None:
        by_ip = {ip: ns for ns, ip in HOSTS.items()} | {HEAD_IP: "head"}
        self.nodes = {n["NodeID"]: by_ip.get(n["NodeManagerAddress"], "?") for n in ray.nodes() if n["Alive"]}


@pytest.fixture(scope="module")
def hosts():
    if not namespaces_available():
        pytest.skip("the multi-host test needs root and iproute2 (ip netns) to make hosts")
    try:
        _make_hosts()
    except subprocess.CalledProcessError as err:
        _cleanup()
        pytest.skip(f"network namespaces cannot be made here: {err.stderr.strip()}")
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    env = {**os.environ, **HEALTH, "RAY_SERVE_SLOW_STARTUP_WARNING_S": "120"}
    port, http_port = free_port(), free_port()
    gcs = f"{HEAD_IP}:{port}"
    head = [
        str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
        "--num-cpus=1", '--resources={"head": 1}', "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        for namespace in HOSTS:
            _start_worker(namespace, gcs, env)
        ray.init(address=gcs, namespace="multihost-tests", log_to_driver=False)
        serve.start(http_options={"host": HEAD_IP, "port": http_port, "request_timeout_s": REQUEST_TIMEOUT_S})
        half = {"num_cpus": 0, "resources": {"worker": 0.5}}  # two towers fit a host: three need two
        args = {
            **TEST_ARGS,
            "text": {**TEST_ARGS["text"], **half},
            "image": {**TEST_ARGS["image"], **half},
            "audio": {**TEST_ARGS["audio"], **half},
            "router": {**TEST_ARGS["router"], "resources": {"head": 0.1}},
        }
        serve.run(build_app(args), name="audioclip", route_prefix="/")
        found = MultiHost(f"http://{HEAD_IP}:{http_port}", gcs, env)
        print(f"\nmulti-host app ready {wait_ready(found.url, timeout_s=300):.1f} s after serve.run")
        found.refresh_nodes()
        yield found
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        _cleanup()  # the worker hosts' processes
        kill_cluster(gcs, port)  # the head's


# ---------------------------------------------------------------------------- load with checked answers
TEXTS = ["a dog barking across hosts", "rain on a tin roof", "an engine starting"]


@dataclass
class Load:
    """Closed-loop clients; every answer is compared with the in-process model's vector."""

    url: str
    expected: np.ndarray
    clients: int = 4
    answers: list[tuple[float, int, float]] = field(default_factory=list)  # (time, status, seconds)
    wrong: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)
        ]

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S + 15) as client:
            n = worker
            while not self._stop.is_set():
                which = n % len(TEXTS)
                n += 1
                started = time.monotonic()
                try:
                    r = client.post(f"{self.url}/v1/embed/text", json={"texts": [TEXTS[which]]})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                took = time.monotonic() - started
                self.answers.append((started, status, took))
                if status == 200:
                    got = np.asarray(r.json()["embeddings"], dtype=np.float32)
                    if row_cosines(got, self.expected[which : which + 1]).min() < 0.99999:
                        self.wrong.append(f"text {which}: another vector")
                if status != 200:
                    time.sleep(0.2)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 30)

    def failed(self) -> int:
        return sum(status != 200 for _, status, _ in self.answers)


def _back(hosts: MultiHost, load: Load, since: float, timeout_s: float = 240) -> float:
    """Seconds from ``since`` until the app is ready and a request after it is answered 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            ok = httpx.get(f"{hosts.url}/readyz", timeout=5).status_code == 200
            if ok and any(t > since and s == 200 for t, s, _ in load.answers[-8:]):
                return time.monotonic() - since
        time.sleep(0.5)
    raise AssertionError(f"not back {timeout_s:.0f} s after the fault")


# ---------------------------------------------------------------------------- tests
def test_towers_on_different_hosts_load_weights_across_them(hosts, model):
    towers = {name: hosts.host_of(name) for name in ("TextEncoder", "ImageEncoder", "AudioEncoder")}
    print(f"\ntowers on hosts: {towers}")
    assert "head" not in towers.values() and len(set(towers.values())) >= 2
    store = hosts.store_host()
    crossed = [name for name, host in towers.items() if host != store]
    print(f"weight store on {store}: weights crossed hosts to {crossed}")
    assert crossed  # those towers' weights came through the object store from another host
    r = httpx.post(f"{hosts.url}/v1/embed/text", json={"texts": TEXTS}, timeout=120)
    assert r.status_code == 200, r.text
    assert (
        row_cosines(np.asarray(r.json()["embeddings"], np.float32), model.encode_text(TEXTS).numpy()).min()
        > 0.99999
    )
    image = (INPUTS / "rocket.jpg").read_bytes()
    r = httpx.post(
        f"{hosts.url}/v1/embed/image", content=image, headers={"content-type": "image/jpeg"}, timeout=120
    )
    local = model.encode_image(audioclip.preprocess_image(image)[None]).numpy()
    assert row_cosines(np.asarray(r.json()["embeddings"], np.float32), local).min() > 0.9999


def _fault_under_load(hosts: MultiHost, model, fault, name: str) -> dict:
    expected = model.encode_text(TEXTS).numpy()
    victim = hosts.host_of("TextEncoder")
    with Load(hosts.url, expected) as load:
        time.sleep(5)
        before = len(load.answers)
        at = time.monotonic()
        fault(victim)
        back_s = _back(hosts, load, at)
        time.sleep(3)
    hosts.refresh_nodes()
    moved_to = hosts.host_of("TextEncoder")
    slowest = max(took for _, _, took in load.answers)
    report = {
        "fault": name,
        "host": victim,
        "requests": len(load.answers),
        "before_fault": before,
        "failed": load.failed(),
        "back_s": round(back_s, 1),
        "text_tower_now_on": moved_to,
        "slowest_s": round(slowest, 1),
    }
    print(f"\n{report}")
    assert not load.wrong, load.wrong[:5]
    assert moved_to != victim
    assert slowest <= REQUEST_TIMEOUT_S + 10  # nothing hung past the proxy's timeout
    assert load.failed() <= max(10, len(load.answers) // 4)
    return report


def test_a_worker_host_killed_under_load(hosts, model):
    def kill(namespace: str) -> None:
        for pid in _run("ip", "netns", "pids", namespace).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)

    report = _fault_under_load(hosts, model, kill, "processes killed")
    # the host comes back (a replaced machine): the cluster has room again for the next fault
    _run("ip", "netns", "exec", report["host"], "ip", "link", "set", "lo", "up")
    _start_worker(report["host"], hosts.gcs, hosts.env)
    hosts.refresh_nodes()
    assert report["host"] in hosts.nodes.values()


def test_a_worker_host_cut_off_under_load(hosts, model):
    def cut(namespace: str) -> None:
        _run("ip", "link", "set", f"{namespace}-br", "down")

    _fault_under_load(hosts, model, cut, "link cut")
