"""Ray's own gRPC under TLS (``RAY_USE_TLS``): a cluster started with a CA and node certificate that
this test makes, a driver with them runs a task, a driver without them gets nothing.

The node certificate must name every address Ray dials: ``--node-ip-address`` (127.0.0.1 here) and
the machine's own address, which the GCS still uses to reach itself (Ray's ``get_node_ip_address``).
Without the latter the GCS logs "No match found for server name" and ``ray start`` never returns.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from serve_support import kill_cluster

from audioclip_serve.bench.serveapp import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BIN = Path(sys.executable).parent


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(folder: Path, addresses: list[str]) -> dict[str, str]:
    """A CA and a node certificate it signed (SAN localhost and ``addresses``), as Ray's TLS variables."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("audioclip test CA"))
        .issuer_name(_name("audioclip test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses)]
    node = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "RAY_TLS_CA_CERT": (folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        "RAY_TLS_SERVER_CERT": (folder / "node.crt", node.public_bytes(serialization.Encoding.PEM)),
        "RAY_TLS_SERVER_KEY": (
            folder / "node.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {"RAY_USE_TLS": "1", **{name: str(path) for name, (path, _) in files.items()}}


DRIVER = """
import ray, sys
ray.init(address=sys.argv[1], log_to_driver=False)
print("answer", ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60))
"""


def test_a_tls_cluster_serves_drivers_with_the_ca_and_no_others(tmp_path):
    from ray.util import get_node_ip_address

    tls = make_certificates(tmp_path, sorted({"127.0.0.1", get_node_ip_address()}))
    # Token auth on as well (conftest sets RAY_AUTH_MODE=token), as a secured cluster runs both.
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_TLS") and k != "RAY_USE_TLS"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    started = subprocess.run(start, env={**plain, **tls}, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        with_ca = subprocess.run(
            [sys.executable, "-c", DRIVER, address], env={**plain, **tls}, capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip
        assert "answer 42" in with_ca.stdout, with_ca.stderr[-3000:]
        try:
            without = subprocess.run(
                [sys.executable, "-c", DRIVER, address], env=plain, capture_output=True, text=True, timeout=30
            )
            refused = without.returncode != 0 and "answer" not in without.stdout
            print(f"\ndriver without the CA: exit code {without.returncode}, no answer")
        except subprocess.TimeoutExpired:
            refused = True  # a plaintext client never completes the handshake: no answer either way
            print("\ndriver without the CA: no answer within 30 s (its handshakes fail)")
        assert refused, "a driver without the CA got an answer from the TLS cluster"
    finally:
        kill_cluster(address, port)
