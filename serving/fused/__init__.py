"""genserve's fused sampling operators (`torch.ops.genserve.*`): built at setup, loaded, never compiled on demand.

The C++ sources in csrc/ register one operator per phase of a family's cached step program
(Gated PixelCNN: `gated_refresh`, `gated_step`; PixelCNN: `pixelcnn_refresh`, `pixelcnn_step`;
PixelCNN++: `pixelcnn_pp_refresh`, `pixelcnn_pp_step`;
MAF and WaveNet, whose programs have no refresh: `maf_step`, `wavenet_step`)
on the same state tensors as the exported graphs. `make setup` builds them (`genserve
build-ops`) into a library beside this file, recording the sources' sha256; `load_ops` loads
that library only if it was built from the sources present, so a request never waits for a
compiler and a stale or missing build falls back to the exported graphs with the reason stated.
Where a CUDA device and OpenAI Triton are present, `load_ops` also installs the GPU kernels
(triton_ops) as the operators' CUDA implementations. Where nvcc is present too, `build` also compiles
the CUDA C++ kernels (CUDA_SOURCES: the resident Gated and PixelCNN steps) into a second library, loaded after the
first, whose operators it implements for CUDA.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).parent / "csrc"
BUILD_DIR = Path(__file__).parent / "_build"
LIBRARY_NAME = "genserve_ops"
SOURCES = ("gated_pixelcnn.cpp", "pixelcnn.cpp", "pixelcnn_pp.cpp", "maf.cpp", "wavenet.cpp", "noise.cpp",
           "gated_resident.cpp", "pixelcnn_resident.cpp")
CUDA_LIBRARY_NAME = "genserve_cuda_ops"
CUDA_SOURCES = ("resident_cuda.cpp", "resident_launch.cu")
# Tuned for the machine that builds (setup builds on the machine that serves); an image built on one
# machine and run on others names a portable target instead (GENSERVE_OPS_ARCH=x86-64-v3: AVX2 + FMA).
# IEEE semantics kept: no -ffast-math.
CFLAGS = ("-O3", f"-march={os.environ.get('GENSERVE_OPS_ARCH', 'native')}", "-std=c++17", "-fopenmp")
# nvcc's defaults otherwise: IEEE division and square root, accurate expf (no --use_fast_math); the
# kernels say where a product must not fuse into an addition.
CUDA_CFLAGS = ("-O3", "-std=c++17")


@dataclass(frozen=True)
class OpsStatus:
    """Whether the fused operators are loaded in this process, and if not, why not."""

    loaded: bool
    reason: str  # what was loaded, or why nothing was

    def __bool__(self) -> bool:
        return self.loaded


def sources_digest() -> str:
    """sha256 over the operator sources (and the headers they include), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def library_path(name: str = LIBRARY_NAME) -> Path:
    return BUILD_DIR / f"{name}.so"


def _digest_path(name: str = LIBRARY_NAME) -> Path:
    return BUILD_DIR / f"{name}.sha256"


def builds_cuda() -> bool:
    """Whether `build` compiles the CUDA library too: PyTorch with a CUDA device, and nvcc."""
    from torch.utils import cpp_extension

    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def build(verbose: bool = False) -> Path:
    """Compiles the operator library (a C++ compiler and ninja needed), and where `builds_cuda`, the CUDA
    one; returns the first's path."""
    from torch.utils import cpp_extension

    BUILD_DIR.mkdir(exist_ok=True)
    cpp_extension.load(
        name=LIBRARY_NAME,
        sources=[str(SOURCE_DIR / name) for name in SOURCES],
        build_directory=str(BUILD_DIR),
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )
    _digest_path().write_text(sources_digest() + "\n")
    if builds_cuda():
        cpp_extension.load(
            name=CUDA_LIBRARY_NAME,
            sources=[str(SOURCE_DIR / name) for name in CUDA_SOURCES],
            build_directory=str(BUILD_DIR),
            extra_cflags=list(CUDA_CFLAGS),  # the registration's host code
            extra_cuda_cflags=list(CUDA_CFLAGS),
            is_python_module=False,
            verbose=verbose,
        )
        _digest_path(CUDA_LIBRARY_NAME).write_text(sources_digest() + "\n")
    global _status
    _status = OpsStatus(True, f"built and loaded {library_path()}{_install_gpu_kernels()}")
    return library_path()


_status: OpsStatus | None = None


def load_ops() -> OpsStatus:
    """Loads the built library once per process; never builds."""
    global _status
    if _status is not None:
        return _status
    path = library_path()
    if not path.is_file():
        _status = OpsStatus(False, f"no operator library at {path} (build it: `genserve build-ops`)")
    elif not _digest_path().is_file() or _digest_path().read_text().strip() != sources_digest():
        _status = OpsStatus(False, f"{path} was built from other sources than {SOURCE_DIR} (rebuild: "
                                   "`genserve build-ops`)")
    else:
        try:
            torch.ops.load_library(str(path))
            _status = OpsStatus(True, f"loaded {path}{_install_gpu_kernels()}")
        except (OSError, RuntimeError) as error:
            _status = OpsStatus(False, f"{path} does not load in this torch {torch.__version__}: {error}")
    return _status


def _install_gpu_kernels() -> str:
    """Installs the GPU kernels where a CUDA device exists; says what happened, for the status line."""
    if not torch.cuda.is_available():
        return ""
    try:
        from . import triton_ops
    except ImportError as error:  # OpenAI Triton missing: CUDA sampling runs the exported graphs
        return f"; no GPU kernels ({error})"
    triton_ops.register("CUDA")
    return f"; GPU kernels (Triton) for gated_pixelcnn and pixelcnn{_load_cuda_library()}"


def _load_cuda_library() -> str:
    """Loads the CUDA C++ kernels' library if it was built from the sources present; says what happened."""
    path = library_path(CUDA_LIBRARY_NAME)
    if not path.is_file():
        return "; no CUDA C++ kernels (built by `genserve build-ops` where nvcc is present)"
    digest = _digest_path(CUDA_LIBRARY_NAME)
    if not digest.is_file() or digest.read_text().strip() != sources_digest():
        return f"; no CUDA C++ kernels ({path} was built from other sources: rebuild)"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as error:
        return f"; no CUDA C++ kernels ({path} does not load: {error})"
    return "; CUDA C++ kernels (the resident Gated and PixelCNN steps)"
