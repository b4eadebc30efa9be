// The resident Gated step kernel's launch, compiled by nvcc without PyTorch's headers (the operator
// around it is gated_resident_cuda.cpp, compiled by the host compiler): a quick build of the kernel.
#include <cuda_runtime.h>

#include "gated_resident.cuh"
#include "gated_resident_launch.h"

namespace genserve {

cudaError_t allow_resident_shared_bytes(int bytes) {
  return cudaFuncSetAttribute(gated_step_resident_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

cudaError_t launch_gated_step_resident(const ResidentGatedStep& a, int threads, int64_t shared_bytes,
                                       cudaStream_t stream) {
  gated_step_resident_kernel<<<static_cast<unsigned>(a.n), static_cast<unsigned>(threads),
                               static_cast<size_t>(shared_bytes), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace genserve
