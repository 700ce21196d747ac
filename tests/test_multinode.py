"""A multi-node Ray cluster on one address (``ray.cluster_utils``): towers on different nodes, weights
crossing the object store between nodes, and the loss of a worker node survived. Where network
namespaces can be made, ``tests/test_multihost.py`` does this on hosts with their own addresses and
this module skips."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import ray
from conftest import row_cosines
from ray import serve
from ray.cluster_utils import Cluster
from serve_support import TEST_ARGS, free_port, namespaces_available, wait_ready

from deployments.app import build_app

pytestmark = [
    pytest.mark.serve,
    pytest.mark.slow,
    pytest.mark.skipif(
        namespaces_available(), reason="tests/test_multihost.py runs these on hosts with their own addresses"
    ),
]


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head": 100}, "include_dashboard": False},
    )
    workers = {
        "text_a": cluster.add_node(num_cpus=1, resources={"text_node": 1}),
        "text_b": cluster.add_node(num_cpus=1, resources={"text_node": 1}),
        "audio": cluster.add_node(num_cpus=1, resources={"audio_node": 1}),
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, namespace="audioclip-tests")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    args = {
        **TEST_ARGS,
        "towers": ["text", "audio"],
        "text": {"num_cpus": 0, "resources": {"text_node": 0.5}},
        "audio": {"num_cpus": 0, "resources": {"audio_node": 0.5}, "max_batch_size": 4},
        "router": {"num_cpus": 0, "resources": {"head": 1}},
    }
    serve.run(build_app(args), name="audioclip", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    yield cluster, workers, url
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _describe(name: str) -> dict:
    return serve.get_deployment_handle(name, "audioclip").describe.remote().result(timeout_s=120)


def test_towers_run_on_their_own_nodes_with_weights_from_the_store(cluster, model):
    _, workers, url = cluster
    head_id = ray.get_runtime_context().get_node_id()
    text_node = _describe("TextEncoder")["node_id"]
    audio_node = _describe("AudioEncoder")["node_id"]
    assert text_node in {workers["text_a"].node_id, workers["text_b"].node_id}
    assert audio_node == workers["audio"].node_id
    assert len({head_id, text_node, audio_node}) == 3
    r = httpx.post(f"{url}/v1/embed/text", json={"texts": ["across nodes"]}, timeout=120)
    assert r.status_code == 200
    got = np.asarray(r.json()["embeddings"], dtype=np.float32)
    assert row_cosines(got, model.encode_text(["across nodes"]).numpy()).min() >= 0.99999


def test_losing_a_worker_node_is_survived(cluster, model):
    cluster_obj, workers, url = cluster
    text_node = _describe("TextEncoder")["node_id"]
    victim = next(
        node for key, node in workers.items() if key.startswith("text") and node.node_id == text_node
    )
    started = time.monotonic()
    cluster_obj.remove_node(victim, allow_graceful=False)
    deadline = time.monotonic() + 240
    moved_to = None
    while time.monotonic() < deadline:
        try:
            moved_to = _describe("TextEncoder")["node_id"]
            if moved_to != text_node:
                break
        except Exception:  # noqa: BLE001 - rescheduling in progress
            pass
        time.sleep(2)
    assert moved_to is not None and moved_to != text_node, "text tower was not rescheduled"
    wait_ready(url, timeout_s=120)
    print(f"\nworker node lost: text tower back on another node after {time.monotonic() - started:.1f} s")
    r = httpx.post(f"{url}/v1/embed/text", json={"texts": ["after node loss"]}, timeout=120)
    got = np.asarray(r.json()["embeddings"], dtype=np.float32)
    assert row_cosines(got, model.encode_text(["after node loss"]).numpy()).min() >= 0.99999
