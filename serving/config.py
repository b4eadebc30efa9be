"""The server's configuration: one frozen dataclass per concern, combined into ServerConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RUNTIMES = ("embedded", "triton")
BACKENDS = ("onnx", "torchscript")


@dataclass(frozen=True)
class BatcherConfig:
    """A dynamic batcher per entry point: merge concurrent requests up to a size or a wait.

    `max_batch_size` / `max_queue_delay_us` None take each entry point's manifest values
    (what its Triton config declares); `enabled=False` runs every request alone (the baseline).
    """

    enabled: bool = True
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queued_rows: int = 4096  # beyond this a request is refused RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queued_rows < 1:
            raise ValueError(f"max_queued_rows must be >= 1, got {self.max_queued_rows}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where entry points run: `embedded` (in this process) or `triton` (forwarded to `triton_url`)."""

    kind: str = "embedded"
    backend: str = "onnx"  # embedded: ONNX Runtime (CUDA EP when present) or TorchScript
    device: str = "cpu"  # embedded TorchScript and sampling steps: "cpu" or "cuda"
    fused: bool = True  # embedded sampling: the fused operators where built for the device
    triton_url: str | None = None  # HOST:PORT of Triton's gRPC endpoint
    max_waiting_samples: int = 4096  # sampling queue bound (embedded engine)
    # embedded sampling, where a call runs several rows (the fused CPU operators): the longest a sample
    # that arrives mid-call waits to join the running batch; 0 runs one row per call
    call_budget_ms: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.kind!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.call_budget_ms >= 0:
            raise ValueError(f"call_budget_ms must be >= 0, got {self.call_budget_ms}")
        if self.kind == "triton" and not self.triton_url:
            raise ValueError("the triton runtime needs triton_url (HOST:PORT)")


@dataclass(frozen=True)
class ServerConfig:
    repository: Path = Path("model_repository")
    address: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    metrics_port: int | None = 9095  # None: no metrics endpoint
    max_message_bytes: int = 64 * 1024 * 1024
    max_samples_per_request: int = 1024  # also bounds images/latents per Encode/Decode/Score
    max_importance_work: int = 65536  # a VAE Score's images × importance samples (each one a decoder pass)
    grace_seconds: float = 10.0  # shutdown: in-flight requests get this long to finish
    tls_cert: Path | None = None  # PEM certificate chain and key: serve TLS instead of plaintext
    tls_key: Path | None = None
    # when set, Generative calls need `authorization: Bearer <token>`; kept out of repr, so never logged
    auth_token: str | None = field(default=None, repr=False)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must lie in [0, 65536), got {self.port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_samples_per_request < 1:
            raise ValueError(f"max_samples_per_request must be >= 1, got {self.max_samples_per_request}")
        if self.max_importance_work < 1:
            raise ValueError(f"max_importance_work must be >= 1, got {self.max_importance_work}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"TLS needs both a certificate and a key, got tls_cert={self.tls_cert}, "
                             f"tls_key={self.tls_key}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
