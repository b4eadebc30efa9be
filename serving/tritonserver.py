"""Starting and stopping a real Triton Inference Server on loopback.

The `nvidia-pytriton` wheel carries a real `tritonserver` binary with the Python backend
(and only that backend: a config naming `onnxruntime` or `pytorch` will not load). This
module finds it, assembles a backend folder with the stub for the running
Python (in a temporary folder: the installed wheel is never modified), starts the server
bound to 127.0.0.1 from the current environment (so its Python models import this
environment's genserve, torch and onnxruntime), waits until it is ready, and stops it by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class TritonServerConfig:
    repository: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    address: str = "127.0.0.1"
    startup_timeout_s: float = 120.0
    log_verbose: int = 0
    explicit_model_control: bool = False  # load every model at start, and let clients unload and load them
    exit_on_model_error: bool = True  # False: a model that fails to load is left out, the others serve

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now. The sockets stay bound until all are picked: closed one at
    a time, the kernel may hand the same port out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def pytriton_server_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise FileNotFoundError(
            "no tritonserver: install the nvidia-pytriton wheel (pip install 'genserve[triton]')"
        ) from None
    return Path(pytriton.__file__).parent / "tritonserver"


def _backend_dir(server_dir: Path, into: Path) -> Path:
    """A copy of the wheel's Python backend plus the stub built for this Python version."""
    python = into / "python"
    shutil.copytree(server_dir / "backends" / "python", python)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"the pytriton wheel has no Python backend stub for Python {version}")
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return into


class TritonServer:
    """`with TritonServer(config) as server:` — a running, ready server; stopped on exit."""

    def __init__(self, config: TritonServerConfig, log_path: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    def start(self, attempts: int = 3) -> TritonServer:
        """Starts the server and waits until it is ready. Ports given as 0 are chosen here: tritonserver
        cannot report a port it picked, so a free one is taken and, if another process binds it
        first, the start is retried on fresh ports; `config` then holds the ports in use."""
        wanted = self.config
        names = ("grpc_port", "http_port", "metrics_port")
        for attempt in range(attempts):
            picked = iter(free_ports(len(names)))
            self.config = replace(wanted, **{name: getattr(wanted, name) or next(picked) for name in names})
            try:
                return self._start_once()
            except RuntimeError as error:
                # Triton's log, which the error carries, says which: another process took a picked
                # port, or a picked port equals one the caller gave.
                lost_a_port = any(m in str(error) for m in ("already in use", "at the same address and port"))
                if not lost_a_port or attempt == attempts - 1 or self.config == wanted:
                    raise
        raise ValueError(f"attempts must be >= 1, got {attempts}")

    def _start_once(self) -> TritonServer:
        server_dir = pytriton_server_dir()
        self._workdir = tempfile.TemporaryDirectory(prefix="genserve-triton-")
        work = Path(self._workdir.name)
        backends = _backend_dir(server_dir, work / "backends")
        c = self.config
        command = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={Path(c.repository).resolve()}",
            f"--backend-directory={backends}",
            f"--grpc-address={c.address}", f"--grpc-port={c.grpc_port}",
            f"--http-address={c.address}", f"--http-port={c.http_port}",
            f"--metrics-address={c.address}", f"--metrics-port={c.metrics_port}",
            "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            f"--log-verbose={c.log_verbose}",
        ]
        if c.explicit_model_control:
            command += ["--model-control-mode=explicit", "--load-model=*"]
        if not c.exit_on_model_error:
            command += ["--exit-on-error=false", "--strict-readiness=false"]
        env = dict(os.environ)
        # The stub embeds libpython: it must find this interpreter's shared library, and with
        # this environment's bin/ first on PATH it imports this environment's packages.
        # The copied stub's relative rpath no longer reaches the wheel's bundled libraries.
        bundled = server_dir.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = ":".join(
            filter(None, [sysconfig.get_config_var("LIBDIR"), str(bundled), env.get("LD_LIBRARY_PATH")])
        )
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # keep __pycache__ out of the model repository
        log = open(self.log_path or work / "tritonserver.log", "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_ready()
        return self

    def log_text(self) -> str:
        path = self.log_path or (Path(self._workdir.name) / "tritonserver.log" if self._workdir else None)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + self.config.startup_timeout_s
        client = grpcclient.InferenceServerClient(self.config.grpc_url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.25)
        self.stop()
        log = self.log_text()[-4000:]
        raise TimeoutError(f"tritonserver not ready after {self.config.startup_timeout_s} s:\n{log}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its Python stubs
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._workdir is not None:
            self._log.close()
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
