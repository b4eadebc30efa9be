"""The one exception family the client raises: every failed call carries its gRPC status and message."""

from __future__ import annotations

import grpc


class GenserveError(Exception):
    """A call that failed; `code` is the gRPC status (e.g. grpc.StatusCode.NOT_FOUND), `message` the server's words."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "", attempts: int = 1) -> None:
        tried = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{code.name}: {message}{tried}")
        self.code, self.message, self.method, self.attempts = code, message, method, attempts

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, method: str = "", attempts: int = 1) -> GenserveError:
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", method, attempts)
