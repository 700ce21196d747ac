"""Serve's own floor for a request: the app's shape with no work in it.

An ingress on FastAPI (as the router) and one callee with ``@serve.batch`` and a one-thread executor
(as a tower), served like the demo (``scripts/bench_hops.py`` runs it on a ``LocalHead`` with the
serving environment). What a request costs here is what the two hops cost any app of this shape on
this machine; the demo's query costs that plus its forward plus our own code.

    POST /direct    answered by the ingress (the HTTP hop only)
    POST /hop       the ingress calls the callee, which echoes the body from its executor
    POST /hop?spin_ms=15    the same, the callee's executor busy for 15 ms first (as a forward)
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at import.
import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response

api = FastAPI()


def echo(payloads: list[bytes], spin_ms: float) -> list[bytes]:
    """The payloads back, after ``spin_ms`` of this thread's CPU time: a forward's time on one core,
    without one (and with the GIL held, which a forward's native threads release)."""
    deadline = time.thread_time() + spin_ms / 1e3
    while time.thread_time() < deadline:
        pass
    return payloads


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FloorTower:
    """A tower's calling shape (batching, the forward on a thread of its own) without a model."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="floor-forward")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def call(self, payloads: list[bytes], spin_ms: list[float]) -> list[bytes]:
        run = functools.partial(echo, payloads, max(spin_ms))
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class FloorRouter:
    def __init__(self, tower: DeploymentHandle) -> None:
        self.tower = tower

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        return JSONResponse({"status": "ready"})

    @api.post("/direct")
    async def direct(self, request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @api.post("/hop")
    async def hop(self, request: Request, spin_ms: float = 0.0) -> Response:
        echoed = await self.tower.call.remote(await request.body(), spin_ms)
        return Response(echoed, media_type="application/octet-stream")


app = FloorRouter.bind(FloorTower.bind())
