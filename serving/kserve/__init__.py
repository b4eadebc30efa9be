"""The KServe v2 / Triton gRPC inference protocol, served by genserve beside genserve.v1 (service.py)."""

from .service import SERVICE, SERVICE_NAME, KServeService

__all__ = ["SERVICE", "SERVICE_NAME", "KServeService"]
