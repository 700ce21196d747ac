"""The gRPC layer (Serve's gRPC ingress): ``audioclip.v1.AudioClip`` over the same embedding core,
gate and error table as HTTP.

The router's methods named as the RPCs (``EmbedText``, ``EmbedImage``, ``EmbedAudio``) call
``answer`` here. A refused request ends with the gRPC status of its HTTP one (``GRPC_CODES``) and the
HTTP API's JSON error body as its details, so a client tells the reasons apart the same way on both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import orjson
from ray.serve.grpc_util import RayServegRPCContext

from audioclip.pipeline import Options
from audioclip.windows import WindowSpec
from audioclip_serve.protos import audioclip_pb2 as pb

from .core import EMBED_DIM, Embedded
from .errors import PayloadTooLarge, ServiceError
from .http_api import Service, triaged
from .schemas import window_spec

# Every HTTP status the service answers with (errors.ERROR_STATUSES and InternalError's 500; a test
# checks), as a gRPC code.
# 413 and the overload 503 are RESOURCE_EXHAUSTED, as gRPC's own message-size limit and Serve's own
# backpressure are; a restarting replica or a rollout is UNAVAILABLE (retry).
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
_CODE_BY_TYPE = {"overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED}


def metadata(context: RayServegRPCContext, key: str) -> str:
    """A request metadata value ('' when absent); gRPC keys are lower case."""
    return next((value for k, value in context.invocation_metadata() if k == key), "")


def refuse(context: RayServegRPCContext, error: ServiceError) -> pb.EmbedReply:
    """Ends the call with ``error``'s gRPC code and its JSON body as details (an empty reply)."""
    context.set_code(_CODE_BY_TYPE.get(error.type, GRPC_CODES[error.status]))
    context.set_details(orjson.dumps(error.body()).decode())
    retry_after = error.headers.get("Retry-After")
    if retry_after:
        context.set_trailing_metadata([("retry-after", retry_after)])
    return pb.EmbedReply()


def reply(service: Service, done: Embedded) -> pb.EmbedReply:
    rows = np.ascontiguousarray(done.embeddings, dtype="<f4")
    windows = [
        pb.Window(item=w.item, start_s=w.start_s, end_s=w.end_s, windows=w.windows)
        for w in done.windows or []
    ]
    return pb.EmbedReply(
        rows=rows.shape[0],
        dim=EMBED_DIM,
        vectors=rows.tobytes(),
        model=service.args.model_name,
        checkpoint_sha256=done.checkpoint,
        usage_tokens=done.usage_tokens,
        windows=windows,
    )


async def answer(
    service: Service,
    request: Any,
    context: RayServegRPCContext,
    embed: Callable[[], Awaitable[Embedded]],
) -> pb.EmbedReply:
    """The one path of every RPC: key, body size, admission, ``embed()``, and every failure turned
    into its status by the HTTP API's own triage (an unexpected one: INTERNAL, no traceback sent)."""
    try:
        service.gate.authorize(metadata(context, "authorization"))
        limit = service.args.limits.max_body_bytes
        if request.ByteSize() > limit:
            raise PayloadTooLarge(f"request is over the limit of {limit} bytes")
        with service.gate.admit():
            return reply(service, await embed())
    except Exception as err:  # noqa: BLE001 - every failure is answered: triaged says how
        return refuse(context, triaged(err))


def text(service: Service, request: pb.TextRequest) -> Callable[[], Awaitable[Embedded]]:
    options = Options(truncate=request.truncate)
    return lambda: service.core.embed(
        "text", list(request.texts), normalize=request.normalize, options=options
    )


def image(service: Service, request: pb.ImageRequest) -> Callable[[], Awaitable[Embedded]]:
    return lambda: service.core.embed("image", list(request.images), normalize=request.normalize)


def audio(service: Service, request: pb.AudioRequest) -> Callable[[], Awaitable[Embedded]]:
    async def embed() -> Embedded:
        given = {"pool"} if request.pool else set()
        windows = window_spec(  # validates, as for HTTP: 400
            request.window_s if request.HasField("window_s") else None,
            request.hop_s if request.HasField("hop_s") else None,
            request.pool or WindowSpec.pool,
            given=given,
        )
        return await service.core.embed(
            "audio", list(request.clips), normalize=request.normalize, options=Options(windows=windows)
        )

    return embed
