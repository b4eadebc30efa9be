// Several whole-row calls in one operator call, with the engine's per-row bookkeeping done here.
//
// On the CPU a batch-1 row call takes ~250 µs, and the engine's Python around it (picking the
// row's noise, writing its pixels into the images, advancing the positions, finding the rows
// that completed) took ~150 µs more: the call evicts the interpreter's working set from the
// caches, so every Python statement after it runs cold. When nothing needs the engine between
// rows (no waiting sample would join the running batch), it runs `rows` rows per call through this loop.
#pragma once

#include <ATen/ATen.h>

#include <cstring>

namespace genserve {

inline void check_cpu(const at::Tensor& t, at::ScalarType type, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == dim && t.is_contiguous(), name,
              ": expected a contiguous CPU tensor of ", dim, " dims and type ", type, ", got ", t.sizes(), " ",
              t.scalar_type());
}

// The checks of a multi-row call's controls (for_rows, below): pixels (n, 1, H, W) uint8;
// positions (n, 1) int64, each a row start with `rows` rows left; noise (n, H * W, 1) float32,
// each sample's noise over its whole image.
inline void check_rows(const at::Tensor& pixels, const at::Tensor& positions, const at::Tensor& noise, int64_t rows) {
  check_cpu(pixels, at::kByte, 4, "pixels");
  check_cpu(positions, at::kLong, 2, "positions");
  check_cpu(noise, at::kFloat, 3, "noise");
  const int64_t n = positions.size(0), width = pixels.size(3), length = pixels.size(2) * width;
  TORCH_CHECK(pixels.size(0) == n && pixels.size(1) == 1 && noise.size(0) == n && noise.size(1) == length &&
                  noise.size(2) == 1,
              "pixels, noise: expected (n, 1, H, W) and (n, H * W, 1) for n = ", n, ", got ", pixels.sizes(), " and ",
              noise.sizes());
  TORCH_CHECK(rows >= 0, "rows: must be >= 0, got ", rows);
  int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK(pos[s] >= 0 && pos[s] % width == 0 && pos[s] + rows * width <= length, "positions: slot ", s,
                " at ", pos[s], " does not start one of ", rows, " rows left in an image of ", length, " pixels");
}

// `rows` row calls for slots that each start a row: before each, the row's noise is picked at the
// slots' positions; after, its pixels go into `pixels` and the positions advance by a row.
// `row(step_noise, another_follows)` makes one call on (n, W, 1) noise and returns its (n, W, 1)
// int64 pixels; `another_follows` says whether this call makes another row after it.
template <class RowCall>
void for_rows(const at::Tensor& pixels, const at::Tensor& positions, const at::Tensor& noise, int64_t rows,
              RowCall row) {
  check_rows(pixels, positions, noise, rows);
  const int64_t n = positions.size(0), width = pixels.size(3), length = pixels.size(2) * width;
  int64_t* pos = positions.data_ptr<int64_t>();
  const float* all_noise = noise.data_ptr<float>();
  uint8_t* images = pixels.data_ptr<uint8_t>();
  at::Tensor step_noise = at::empty({n, width, 1}, noise.options());
  float* step = step_noise.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t s = 0; s < n; ++s)
      std::memcpy(step + s * width, all_noise + s * length + pos[s], width * sizeof(float));
    const at::Tensor pixel = row(step_noise, r + 1 < rows);
    const int64_t* chosen = pixel.data_ptr<int64_t>();
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t j = 0; j < width; ++j) images[s * length + pos[s] + j] = static_cast<uint8_t>(chosen[s * width + j]);
      pos[s] += width;
    }
  }
}

}  // namespace genserve
