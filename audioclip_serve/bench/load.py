"""Load generation: closed-loop HTTP (aiohttp), gRPC (grpc.aio) and handle-API clients in separate
processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import pickle
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .common import APP, log
from .inputs import KINDS, batch_of

TIMING_HEADERS = ("total", "preprocess", "queue", "inference")  # the router's x-*-time headers (ms)


@dataclass(frozen=True)
class Case:
    path: str  # "http", "grpc" or "handle"
    kind: str
    items: int
    concurrency: int


@dataclass
class LoadResult:
    """What a load process measured for one case."""

    latencies_s: list[float]
    items_ok: int
    errors: dict[str, int]
    elapsed_s: float
    check: str
    server_ms: dict[str, float] = field(default_factory=dict)  # mean x-*-time headers (HTTP)


def http_request(kind: str, items: list) -> tuple[str, bytes, dict[str, str]]:
    """Route, body and headers of one request carrying ``items``: a raw body for one image or clip."""
    modality = KINDS[kind].modality
    if modality == "text":
        return "/v1/embed/text", json.dumps({"texts": items}).encode(), {"content-type": "application/json"}
    if len(items) == 1:
        media = "image/jpeg" if modality == "image" else "audio/wav"
        return f"/v1/embed/{modality}", items[0], {"content-type": media}
    field_name = "images" if modality == "image" else "audio"
    body = json.dumps({field_name: [base64.b64encode(b).decode() for b in items]}).encode()
    return f"/v1/embed/{modality}", body, {"content-type": "application/json"}


async def closed_loop(
    send: Callable[[int], Awaitable[int]], concurrency: int, seconds: float, max_requests: int, label: str
) -> tuple[list[float], int, Counter, float]:
    """``concurrency`` clients, each sending its next request when its last is answered, until
    ``seconds`` have passed or ``max_requests`` were issued; in-flight requests are awaited.
    ``send(i)`` returns the items answered. Returns latencies, items, error counts, elapsed."""
    latencies: list[float] = []
    errors: Counter = Counter()
    state = {"issued": 0, "items": 0}
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        while state["issued"] < max_requests and time.perf_counter() < deadline:
            index = state["issued"]
            state["issued"] += 1
            t0 = time.perf_counter()
            try:
                answered = await send(index)  # not `+= await`: that would lose concurrent updates
                state["items"] += answered
                latencies.append(time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - any failure is counted, the case goes on
                errors[type(err).__name__ + (f" {err}" if isinstance(err, HttpError) else "")] += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(5.0)
            elapsed = time.perf_counter() - started
            rate = state["items"] / elapsed
            log(f"    {label}: {elapsed:.0f} s, {len(latencies)} answered, {rate:.1f} items/s")

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        reporter.cancel()
    return latencies, state["items"], errors, time.perf_counter() - started


async def drive(
    send: Callable[[int], Awaitable[int]], case: Case, seconds: float, max_requests: int, warmup: bool
) -> tuple[list[float], int, Counter, float]:
    """``closed_loop`` for one case; ``warmup``: a single untimed request instead."""
    if warmup:
        seconds, max_requests = 3600.0, 1
    return await closed_loop(send, case.concurrency, seconds, max_requests, label(case))


class HttpError(Exception):
    """A non-200 answer (over gRPC: a code other than OK)."""


async def run_http(
    case: Case, url: str, pool: list, seconds: float, max_requests: int, warmup: bool
) -> LoadResult:
    """One case over HTTP (aiohttp); ``warmup``: a single untimed request instead."""
    import aiohttp

    bodies = [http_request(case.kind, batch_of(pool, i * case.items, case.items)) for i in range(4)]
    check: list[str] = []
    server: Counter = Counter()  # sums of the app's x-{total,preprocess,queue,inference}-time headers
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=case.concurrency)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as session:

        async def send(index: int) -> int:
            route, body, headers = bodies[index % len(bodies)]
            async with session.post(route, data=body, headers=headers) as response:
                payload = await response.read()
                if response.status != 200:
                    raise HttpError(str(response.status))
                for key in TIMING_HEADERS:
                    with contextlib.suppress(KeyError, ValueError):
                        server[key] += float(response.headers[f"x-{key}-time"])
                server["n"] += 1
                if not check:
                    rows = json.loads(payload)["embeddings"]
                    check.append(f"{len(rows)}x{len(rows[0])}")
                return case.items

        lat, items, errors, elapsed = await drive(send, case, seconds, max_requests, warmup)
    n = server.pop("n", 0) or 1
    means = {key: round(total / n, 2) for key, total in server.items()}
    return LoadResult(lat, items, dict(errors), elapsed, check[0] if check else "", means)


def grpc_request(kind: str, items: list) -> tuple[str, Any]:
    """The RPC and request message carrying ``items``."""
    from audioclip_serve.protos import audioclip_pb2 as pb

    modality = KINDS[kind].modality
    if modality == "text":
        return "EmbedText", pb.TextRequest(texts=items)
    if modality == "image":
        return "EmbedImage", pb.ImageRequest(images=items)
    return "EmbedAudio", pb.AudioRequest(clips=items)


async def run_grpc(
    case: Case, target: str, pool: list, seconds: float, max_requests: int, warmup: bool
) -> LoadResult:
    """One case over Serve's gRPC ingress (one HTTP/2 channel, as a gRPC client keeps);
    ``warmup``: a single untimed request instead."""
    import grpc

    from audioclip_serve.protos import audioclip_pb2_grpc as pb_grpc

    requests = [grpc_request(case.kind, batch_of(pool, i * case.items, case.items)) for i in range(4)]
    check: list[str] = []
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=unlimited) as channel:
        stub = pb_grpc.AudioClipStub(channel)

        async def send(index: int) -> int:
            rpc, message = requests[index % len(requests)]
            try:
                reply = await getattr(stub, rpc)(message, metadata=(("application", APP),))
            except grpc.aio.AioRpcError as err:
                raise HttpError(err.code().name) from None
            if not check:
                check.append(f"{reply.rows}x{reply.dim}")
            return reply.rows

        lat, items, errors, elapsed = await drive(send, case, seconds, max_requests, warmup)
    return LoadResult(lat, items, dict(errors), elapsed, check[0] if check else "")


async def run_handle(case: Case, pool: list, seconds: float, max_requests: int, warmup: bool) -> LoadResult:
    """One case through the handle API from this Ray driver; ``warmup``: a single untimed request."""
    from ray import serve

    app = serve.get_app_handle(APP)
    method = {"text": app.embed_text, "image": app.embed_image, "audio": app.embed_audio}[
        KINDS[case.kind].modality
    ]
    check: list[str] = []

    async def send(index: int) -> int:
        out = await method.remote(batch_of(pool, index * case.items, case.items))
        if not check:
            check.append("x".join(str(d) for d in out.shape))
        return len(out)

    lat, items, errors, elapsed = await drive(send, case, seconds, max_requests, warmup)
    return LoadResult(lat, items, dict(errors), elapsed, check[0] if check else "")


def load_worker(conn: Connection, mode: str, inputs_path: str, target: str) -> None:
    """A load process: receives ``(case, seconds, max_requests, warmup)``, answers a ``LoadResult``;
    None ends it. ``target`` is the app URL (http), the gRPC ``host:port`` (grpc) or the Ray GCS
    address (handle)."""
    with open(inputs_path, "rb") as f:
        inputs = pickle.load(f)
    if mode == "handle":
        import ray

        ray.init(address=target, namespace="serve", log_to_driver=False, logging_level="ERROR")
    while (message := conn.recv()) is not None:
        case, seconds, max_requests, warmup = message
        pool = inputs[case.kind]
        if mode == "http":
            result = asyncio.run(run_http(case, target, pool, seconds, max_requests, warmup))
        elif mode == "grpc":
            result = asyncio.run(run_grpc(case, target, pool, seconds, max_requests, warmup))
        else:
            result = asyncio.run(run_handle(case, pool, seconds, max_requests, warmup))
        conn.send(result)


class LoadProcess:
    """A load process started with ``spawn`` and driven through a pipe."""

    def __init__(self, mode: str, inputs_path: Path, target: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=load_worker, args=(child, mode, str(inputs_path), target), daemon=True)
        self.proc.start()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


class LoadPool:
    """Several load processes sharing one case's concurrency (one Python client saturates at a few
    thousand requests/s); their latencies and counts are merged into one ``LoadResult``."""

    def __init__(self, mode: str, inputs_path: Path, target: str, processes: int) -> None:
        self.workers = [LoadProcess(mode, inputs_path, target) for _ in range(max(1, processes))]
        self.pids = [w.proc.pid for w in self.workers]

    def run(self, case: Case, seconds: float, max_requests: int, warmup: bool = False) -> LoadResult:
        n = 1 if warmup else min(len(self.workers), case.concurrency)
        shares = [case.concurrency // n + (i < case.concurrency % n) for i in range(n)]
        for worker, share in zip(self.workers, shares, strict=False):
            sub = Case(case.path, case.kind, case.items, share)
            limit = max(1, round(max_requests * share / case.concurrency))
            worker.conn.send((sub, seconds, limit, warmup))
        parts: list[LoadResult] = [worker.conn.recv() for worker in self.workers[:n]]
        errors: Counter = Counter()
        server: Counter = Counter()
        for part in parts:
            errors.update(part.errors)
            for key, mean in part.server_ms.items():
                server[key] += mean * len(part.latencies_s)
        answered = sum(len(part.latencies_s) for part in parts) or 1
        return LoadResult(
            latencies_s=[t for part in parts for t in part.latencies_s],
            items_ok=sum(part.items_ok for part in parts),
            errors=dict(errors),
            elapsed_s=max(part.elapsed_s for part in parts),
            check=next((part.check for part in parts if part.check), ""),
            server_ms={key: round(total / answered, 2) for key, total in server.items()},
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def label(case: Case) -> str:
    return f"{case.path} {case.kind} x{case.items} c{case.concurrency}"
