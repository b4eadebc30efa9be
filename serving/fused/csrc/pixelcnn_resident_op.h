// The resident PixelCNN step's operator around its kernel (pixelcnn_resident.cuh): the checks and the
// kernel's arguments, the same on both devices (pixelcnn_resident.cpp: CPU threads; resident_cuda.cpp: a GPU).
//
// genserve::pixelcnn_step_resident(positions, noise, temperature, image_rows!, block_rows!, teacher?, pixel!,
//   logits!, weights, roll, threads, shared_bytes): pixelcnn_step's arguments and outputs, the row caches
//   written in place (with `roll`, first moved up a row: pixelcnn_row's refresh); `threads` per block (a
//   multiple of 32), `shared_bytes` the shared memory a block may use (-1: the device's most).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "pixelcnn_resident.h"
#include "resident_op.h"

namespace genserve {

// The kernel's arguments, checked; `shared_bytes` (the budget, or -1 for `device_most`) becomes what a
// block needs.
inline ResidentPixelCNNStep pixelcnn_resident_arguments(
    const at::Tensor& positions, const at::Tensor& noise, const at::Tensor& temperature, const at::Tensor& image_rows,
    at::TensorList block_rows, const std::optional<at::Tensor>& teacher, const at::Tensor& pixel,
    const at::Tensor& logits, at::TensorList weights, bool roll, int64_t threads, int64_t& shared_bytes,
    int64_t device_most) {
  const at::Device device = positions.device();
  TORCH_CHECK(weights.size() == 12, "pixelcnn weights: expected 12 tensors, got ", weights.size());
  check_resident_weights(weights, "pixelcnn", device);
  check_resident(image_rows, at::kFloat, 4, "image_rows", device);
  for (const at::Tensor& rows : block_rows) check_resident(rows, at::kFloat, 4, "block_rows", device);
  check_resident_threads(threads);

  ResidentPixelCNNStep a{};
  a.io = resident_io(positions, noise, temperature, teacher, pixel, logits, weights[10].size(1), "pixelcnn");
  const int64_t blocks = weights[2].numel() ? weights[2].size(0) : 0;
  TORCH_CHECK(static_cast<int64_t>(block_rows.size()) == blocks, "block_rows: ", block_rows.size(), " caches for ",
              blocks, " blocks");
  TORCH_CHECK(blocks <= kMaxResidentBlocks, "pixelcnn weights: ", blocks, " residual blocks, more than a block "
              "holds (", kMaxResidentBlocks, ")");
  a.blocks = static_cast<int>(blocks);
  a.hidden = static_cast<int>(weights[1].size(0) / 2);
  a.output_channels = static_cast<int>(weights[8].size(1));
  const int64_t n = a.io.n, span = a.io.span, h = a.hidden;
  a.r0 = static_cast<int>(image_rows.size(2));
  a.width = image_rows.size(3) - 2 * (a.r0 - 1);
  TORCH_CHECK(image_rows.size(0) == n && image_rows.size(1) == 1 && a.r0 >= 1 && a.width >= 1 &&
                  weights[0].size(0) == a.r0 * (2 * a.r0 - 1),
              "image_rows: shape ", image_rows.sizes(), " does not match the weights");
  a.rows = blocks ? static_cast<int>(block_rows[0].size(2)) : 1;
  const int64_t R = a.rows, k = 2 * R - 1;
  for (const at::Tensor& rows : block_rows)
    TORCH_CHECK(rows.sizes() == at::IntArrayRef({n, h, R, a.width + 2 * (R - 1)}), "block rows: shape ", rows.sizes(),
                " does not match the weights");
  TORCH_CHECK(!blocks || weights[4].sizes() == at::IntArrayRef({blocks, h * R * k, h}), "block rows: ", R,
              " rows do not match the masked kernels ", weights[4].sizes());
  TORCH_CHECK(span >= 1 && span <= a.width, "noise: ", span, " pixels per call, a row is ", a.width);

  a.image_rows = image_rows.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b) a.block_rows[b] = block_rows[b].data_ptr<float>();
  a.masked_w = weights[4].data_ptr<float>();
  // Packed order: in_w, in_b, reduce_w, reduce_b, masked_w, masked_b, expand_w, expand_b, oh_w, oh_b, lg_w, lg_b.
  const int packed[kPixelCNNStepWeights] = {4, 2, 6, 8, 0, 10, 1, 3, 5, 7, 9, 11};
  for (int i = 0; i < kPixelCNNStepWeights; ++i) a.weights[i] = resident_weight(weights[packed[i]], i >= kInB);
  a.weights[kCentreW].rows = blocks * R * h;  // the centre row's taps up to the centre, gathered
  a.weights[kCentreW].cols = h;
  a.roll = roll;

  const int64_t budget = shared_bytes < 0 ? device_most : std::min(shared_bytes, device_most);
  shared_bytes = plan_pixelcnn_shared_memory(a, budget);
  TORCH_CHECK(shared_bytes >= 0, "shared_bytes: ", budget, " bytes do not hold a block's activations (",
              pixelcnn_activation_floats(a) * 4, " bytes)");
  return a;
}

}  // namespace genserve
