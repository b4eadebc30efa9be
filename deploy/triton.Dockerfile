# NVIDIA's Triton container with genserve installed, for the samplers' Python models (genserve's
# engine and fused operators) and for exporting the native-flavour repository at pod start.
# Build from the repository root:  docker build -f deploy/triton.Dockerfile -t genserve-triton .
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/genserve
# torch first, from the CPU index: the samplers run on the CPU; Triton's own backends use the GPU.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY export export
COPY serving serving
COPY clients clients
# The fused operators for any x86-64 CPU with AVX2 and FMA (the container has g++).
RUN pip install --no-cache-dir . && GENSERVE_OPS_ARCH=x86-64-v3 genserve build-ops
