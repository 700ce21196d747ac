"""Helpers for the tests that run a real local Ray cluster with the app deployed."""

from __future__ import annotations

import os
import socket
import time

import httpx

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
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout_s: float = 240.0) -> float:
    """Seconds until ``/readyz`` answers 200."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=10).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{base_url} not ready after {timeout_s} s")
