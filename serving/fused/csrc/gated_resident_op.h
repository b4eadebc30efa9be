// The resident Gated step's operator around its kernel (gated_resident.cuh): the checks and the
// kernel's arguments, the same on both devices (gated_resident.cpp: CPU threads; resident_cuda.cpp: a GPU).
//
// genserve::gated_step_resident(positions, noise, temperature, links, image_context!, hidden_context!,
//   teacher?, pixel!, logits!, weights, threads, shared_bytes): gated_step's arguments and outputs, the
//   contexts advanced in place; `threads` per block (a multiple of 32), `shared_bytes` the shared memory
//   a block may use (-1: the device's most; 227 KB on the CPU, an H100's).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "gated_resident.h"
#include "resident_op.h"

namespace genserve {

// The kernel's arguments, checked; `shared_bytes` (the budget, or -1 for `device_most`) becomes what a
// block needs.
inline ResidentGatedStep resident_arguments(const at::Tensor& positions, const at::Tensor& noise,
                                            const at::Tensor& temperature, const at::Tensor& links,
                                            const at::Tensor& image_context, const at::Tensor& hidden_context,
                                            const std::optional<at::Tensor>& teacher, const at::Tensor& pixel,
                                            const at::Tensor& logits, at::TensorList weights, int64_t threads,
                                            int64_t& shared_bytes, int64_t device_most) {
  const at::Device device = positions.device();
  TORCH_CHECK(weights.size() == 18 || weights.size() == 20,
              "gated weights: expected 18 tensors (20 with conditioning), got ", weights.size());
  check_resident_weights(weights, "gated", device);
  check_resident(links, at::kFloat, 4, "links", device);
  check_resident(image_context, at::kFloat, 2, "image_context", device);
  check_resident(hidden_context, at::kFloat, 3, "hidden_context", device);
  check_resident_threads(threads);

  ResidentGatedStep a{};
  a.io = resident_io(positions, noise, temperature, teacher, pixel, logits, weights[16].size(1), "gated");
  a.layers = static_cast<int>(weights[4].size(0));
  a.channels = static_cast<int>(weights[10].size(1));
  a.p0 = static_cast<int>(weights[8].size(0) - 1);
  a.p = static_cast<int>(weights[9].size(1) / a.channels - 1);
  a.output_channels = static_cast<int>(weights[14].size(1));
  const int64_t n = a.io.n, L = a.layers, C = a.channels;
  TORCH_CHECK(links.size(0) == n && links.size(1) == L && links.size(2) == 2 * C, "links: shape ", links.sizes(),
              " does not match the weights");
  TORCH_CHECK(image_context.sizes() == at::IntArrayRef({n, a.p0 + 1}) &&
                  hidden_context.sizes() == at::IntArrayRef({n, L - 1, a.p * C}),
              "contexts: shapes ", image_context.sizes(), " and ", hidden_context.sizes(), " do not match the weights");
  a.links = links.data_ptr<float>();
  a.image_context = image_context.data_ptr<float>();
  a.hidden_context = hidden_context.data_ptr<float>();
  for (int k = 0; k < kGatedStepWeights; ++k)  // the step's ten, packed after the refresh's eight
    a.weights[k] = resident_weight(weights[8 + k], k == kHoutB || k == kSkipB || k == kOhB || k == kLgB);
  a.weights[kHoutW].rows = (L - 1) * C;  // the last layer's output 1x1 feeds nothing
  a.width = links.size(3);

  const int64_t budget = shared_bytes < 0 ? device_most : std::min(shared_bytes, device_most);
  shared_bytes = plan_shared_memory(a, static_cast<int>(threads), budget);
  TORCH_CHECK(shared_bytes >= 0, "shared_bytes: ", budget, " bytes do not hold a block's activations (",
              activation_floats(a) * 4, " bytes)");
  return a;
}

}  // namespace genserve
