// The resident kernels' launches (resident_launch.cu), for the host code around them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gated_resident.h"
#include "pixelcnn_resident.h"

namespace genserve {

// Lets the kernels have up to `bytes` of dynamic shared memory (past 48 KB it must be asked for).
cudaError_t allow_resident_shared_bytes(int bytes);

// A kernel on `stream`: a.n blocks of `threads`, `shared_bytes` as its plan sized them.
cudaError_t launch_gated_step_resident(const ResidentGatedStep& a, int threads, int64_t shared_bytes,
                                       cudaStream_t stream);
cudaError_t launch_pixelcnn_step_resident(const ResidentPixelCNNStep& a, int threads, int64_t shared_bytes,
                                          cudaStream_t stream);

}  // namespace genserve
