// What the resident kernels (gated_resident.cuh, pixelcnn_resident.cuh) and the host code around them
// share: a step's controls and outputs, how a weight is described, and where in shared memory it goes.
#pragma once

#include <cstdint>

#include "device.h"

namespace genserve {

constexpr int kSplit = 8;  // lanes per output: a product over K inputs is K/8 dependent multiply-adds

// A packed weight: `rows` rows of `cols` floats, and where a block reads it.
struct ResidentWeight {
  const float* data;      // global memory
  int64_t rows, cols;
  int64_t shared_offset;  // in floats; -1: read from global memory (or held elsewhere: `held`)
  bool permuted;          // in shared memory with its columns permuted by row (o ^ 4 (r mod 8))
  bool bias;              // read by index, never permuted
  bool held;              // kept out of shared memory (the Gated skip weights, in registers)
};

// What every resident step reads and writes besides its states: the controls, the pixels, a teacher's.
struct ResidentStepIO {
  const int64_t* positions;  // (n, 1)
  const float* noise;        // (n, span, 1)
  const float* temperature;  // (n, 1)
  const int64_t* teacher;    // (n, span, 1) or null
  int64_t* pixel;            // (n, span, 1)
  float* logits_out;         // (n, span, levels) where a teacher is given
  int64_t n, span;
  int levels;
  float level_scale;         // level v's value in [-1, 1]: v * level_scale - 1
};

GENSERVE_HOST_DEVICE int64_t round_up4(int64_t floats) { return (floats + 3) / 4 * 4; }

// Each weight in turn into shared memory after `used` floats, where it fits in `budget` floats (and is
// not held elsewhere); a matrix whose rows are a multiple of 32 floats permuted. Returns the floats used.
inline int64_t place_weights(ResidentWeight* weights, int count, int64_t used, int64_t budget) {
  for (int k = 0; k < count; ++k) {
    ResidentWeight& w = weights[k];
    const int64_t size = round_up4(w.rows * w.cols);
    const bool fits = !w.held && used + size <= budget;
    w.shared_offset = fits ? used : -1;
    w.permuted = fits && !w.bias && w.cols % 32 == 0;
    if (fits) used += size;
  }
  return used;
}

}  // namespace genserve
