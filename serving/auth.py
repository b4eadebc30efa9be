"""Bearer-token authentication for the Generative service (health and reflection stay open for probes)."""

from __future__ import annotations

import hmac

import grpc

PROTECTED_PREFIX = "/genserve.v1.Generative/"


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: expected 'Bearer <token>' metadata")


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: expected 'Bearer <token>' metadata")
    yield  # pragma: no cover - makes this an async generator, the shape a streaming handler has


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Generative calls without `authorization: Bearer <token>` (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if not details.method.startswith(PROTECTED_PREFIX):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self.expected):  # constant time: no timing oracle on the token
            return await continuation(details)
        if details.method.endswith("/SampleStream"):
            return grpc.unary_stream_rpc_method_handler(_deny_stream)
        return grpc.unary_unary_rpc_method_handler(_deny)
