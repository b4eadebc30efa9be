// What the resident kernels' operators (gated_resident_op.h, pixelcnn_resident_op.h) share on the host:
// the device's shared memory on the CPU build, and their tensors' checks.
#pragma once

#include <ATen/ATen.h>

#include "resident.h"

namespace genserve {

constexpr int64_t kH100SharedBytes = 227 * 1024;  // the most dynamic shared memory an H100 or H200 block may have

inline void check_resident(const at::Tensor& t, at::ScalarType type, int64_t dim, const char* name,
                           const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == type && t.dim() == dim && t.is_contiguous(), name,
              ": expected a contiguous ", device, " tensor of ", dim, " dims and type ", type, ", got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

inline void check_resident_threads(int64_t threads) {
  TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0, "threads: a multiple of 32 in [32, 1024], got ",
              threads);
}

// A weight tensor as a kernel reads it: `rows` rows of its last dimension's floats.
inline ResidentWeight resident_weight(const at::Tensor& weight, bool bias) {
  const int64_t cols = weight.size(-1);
  return {weight.data_ptr<float>(), weight.numel() / cols, cols, -1, false, bias, false};
}

}  // namespace genserve
