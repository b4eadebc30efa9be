// What the resident kernels' operators (gated_resident_op.h, pixelcnn_resident_op.h) share on the host:
// the device's shared memory on the CPU build, and their tensors' checks.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "resident.h"

namespace genserve {

constexpr int64_t kH100SharedBytes = 227 * 1024;  // the most dynamic shared memory an H100 or H200 block may have

inline void check_resident(const at::Tensor& t, at::ScalarType type, int64_t dim, const char* name,
                           const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == type && t.dim() == dim && t.is_contiguous(), name,
              ": expected a contiguous ", device, " tensor of ", dim, " dims and type ", type, ", got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

inline void check_resident_weights(at::TensorList weights, const char* family, const at::Device& device) {
  for (const at::Tensor& t : weights)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device() == device && t.dim() >= 1, family,
                " weights must be contiguous float32 tensors on ", device);
}

inline void check_resident_threads(int64_t threads) {
  TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0, "threads: a multiple of 32 in [32, 1024], got ",
              threads);
}

// The controls, pixels and teacher of a step of `levels` pixel levels, checked. `family` names the
// weights the levels were read from.
inline ResidentStepIO resident_io(const at::Tensor& positions, const at::Tensor& noise, const at::Tensor& temperature,
                                  const std::optional<at::Tensor>& teacher, const at::Tensor& pixel,
                                  const at::Tensor& logits, int64_t levels, const char* family) {
  const at::Device device = positions.device();
  check_resident(positions, at::kLong, 2, "positions", device);
  check_resident(noise, at::kFloat, 3, "noise", device);
  check_resident(temperature, at::kFloat, 2, "temperature", device);
  check_resident(pixel, at::kLong, 3, "pixel", device);
  TORCH_CHECK(logits.device() == device && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits: expected a contiguous float32 tensor on ", device);
  TORCH_CHECK(levels >= 2 && levels <= 256, family, " weights: 2..256 pixel levels, got ", levels);
  const int64_t n = positions.size(0), span = noise.size(1);
  TORCH_CHECK(positions.size(1) == 1 && noise.size(0) == n && noise.size(2) == 1 && temperature.size(0) == n,
              "positions, noise, temperature: expected (n, 1), (n, span, 1) and (n, 1), got ", positions.sizes(), ", ",
              noise.sizes(), " and ", temperature.sizes());
  if (teacher.has_value()) {
    check_resident(*teacher, at::kLong, 3, "teacher", device);
    TORCH_CHECK(teacher->sizes() == noise.sizes(), "teacher: expected the noise's shape ", noise.sizes(), ", got ",
                teacher->sizes());
  }
  TORCH_CHECK(pixel.sizes() == at::IntArrayRef({n, span, 1}) &&
                  logits.numel() == (teacher.has_value() ? n * span * levels : 0),
              "pixel, logits: outputs of the wrong shape");
  return {positions.data_ptr<int64_t>(),
          noise.data_ptr<float>(),
          temperature.data_ptr<float>(),
          teacher.has_value() ? teacher->data_ptr<int64_t>() : nullptr,
          pixel.data_ptr<int64_t>(),
          logits.data_ptr<float>(),
          n,
          span,
          static_cast<int>(levels),
          static_cast<float>(2.0 / (levels - 1))};
}

// A weight tensor as a kernel reads it: `rows` rows of its last dimension's floats.
inline ResidentWeight resident_weight(const at::Tensor& weight, bool bias) {
  const int64_t cols = weight.size(-1);
  return {weight.data_ptr<float>(), weight.numel() / cols, cols, -1, false, bias, false};
}

}  // namespace genserve
