// The resident Gated step kernel's launch (gated_resident_launch.cu), for the host code around it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gated_resident.h"

namespace genserve {

// Lets the kernel have up to `bytes` of dynamic shared memory (past 48 KB it must be asked for).
cudaError_t allow_resident_shared_bytes(int bytes);

// The kernel on `stream`: a.n blocks of `threads`, `shared_bytes` as plan_shared_memory sized them.
cudaError_t launch_gated_step_resident(const ResidentGatedStep& a, int threads, int64_t shared_bytes,
                                       cudaStream_t stream);

}  // namespace genserve
