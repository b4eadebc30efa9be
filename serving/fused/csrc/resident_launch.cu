// The resident kernels' launches, compiled by nvcc without PyTorch's headers (the operators around them
// are resident_cuda.cpp's, compiled by the host compiler): a quick build of the kernels.
#include <cuda_runtime.h>

#include "gated_resident.cuh"
#include "pixelcnn_resident.cuh"
#include "resident_launch.h"

namespace genserve {

cudaError_t allow_resident_shared_bytes(int bytes) {
  const cudaError_t gated =
      cudaFuncSetAttribute(gated_step_resident_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (gated != cudaSuccess) return gated;
  return cudaFuncSetAttribute(pixelcnn_step_resident_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

cudaError_t launch_gated_step_resident(const ResidentGatedStep& a, int threads, int64_t shared_bytes,
                                       cudaStream_t stream) {
  gated_step_resident_kernel<<<static_cast<unsigned>(a.io.n), static_cast<unsigned>(threads),
                               static_cast<size_t>(shared_bytes), stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_pixelcnn_step_resident(const ResidentPixelCNNStep& a, int threads, int64_t shared_bytes,
                                          cudaStream_t stream) {
  pixelcnn_step_resident_kernel<<<static_cast<unsigned>(a.io.n), static_cast<unsigned>(threads),
                                  static_cast<size_t>(shared_bytes), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace genserve
