"""genserve's clients: the Python client library, the CLI verbs, batch jobs and the latency benchmark.

This package imports only the generated API (`genserve.v1`) and its own modules, never model or
server code. The client classes load lazily, so the `genserve` dispatcher (also in
this package) starts without importing grpc or numpy.
"""

from __future__ import annotations

_EXPORTS = {
    "AsyncClient": "client", "Client": "client", "ClientConfig": "client", "Decoding": "client",
    "Encoding": "client", "ModelInfo": "client", "Progress": "client", "Samples": "client", "Score": "client",
    "GenserveError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
