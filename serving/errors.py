"""The errors a request can end in, and the one place they become gRPC status codes.

Client mistakes are raised as `RequestError` subclasses carrying their status code, so a
handler never chooses a code itself. Anything else that escapes a handler
is a server fault: logged with its traceback and answered INTERNAL without details.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that cannot be served as asked; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RequestError, ValueError):
    """A malformed field: the message names the field and what was expected (a ValueError to non-gRPC callers)."""

    def __init__(self, field: str, expected: str) -> None:
        super().__init__(f"{field}: {expected}")
        self.field = field


class NotFound(RequestError):
    """An unknown model, or a capability the model's family lacks."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(RequestError):
    """Over a configured limit, or a full queue: retry later or ask for less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(RequestError):
    """The request's deadline passed before its work finished; the work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(RequestError):
    """A part the request needs is not answering (e.g. the Triton server behind genserve)."""

    code = grpc.StatusCode.UNAVAILABLE


def status_of(error: BaseException) -> grpc.StatusCode:
    """The status code a handler's exception ends its RPC with."""
    if isinstance(error, RequestError):
        return error.code
    return grpc.StatusCode.INTERNAL
