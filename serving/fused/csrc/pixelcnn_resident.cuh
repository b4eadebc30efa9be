// PixelCNN's step with its weights resident on the chip: a kernel for small batches on a GPU.
//
// The same state tensors and packed weights as pixelcnn_step (csrc/pixelcnn.cpp), the row caches
// written in place; with `roll`, the refresh first (every cache moves up a row), so that a row call is
// one launch. One block per slot. A call has two phases:
// - before its first pixel, each residual block's masked layer's rows-above part (the taps above the
//   pixel's row, fixed while a row is stepped: two thirds of a 3x3 kernel) at every column the call
//   steps, its bias added, from the caches' rows above (staged in shared memory) and the packed kernel
//   read from global memory once;
// - per pixel, the chain: the masked input layer on the image's rows, every residual block (relu, 1x1
//   reduce, the masked layer's centre-row taps up to the pixel, 1x1 expand, residual), the output
//   layers, the inverse-CDF choice; every dense layer split over groups of kSplit lanes (resident.cuh),
//   a barrier after each (3 per residual block), the weights in shared memory where the plan put them
//   (the shipped model's all of them).
// Each block's centre row is kept channels last from p columns left of the call's first pixel, so a
// pixel's centre window is (p + 1) h consecutive floats; what the chain computes goes to the caches
// too, a store nothing in the call waits for.
//
// device.h compiles this source for a GPU (nvcc, resident_launch.cu) and for CPU threads
// (pixelcnn_resident.cpp), where the tests run it against the step graphs and naive sampling.
#pragma once

#include <cmath>
#include <cstdint>

#include "pixelcnn_resident.h"
#include "resident.cuh"

namespace genserve {

// Tap q of the input layer's (row, column) window at padded column j of the image's rows.
struct ImageWindow {
  const float* rows;
  int64_t padded;
  int k;
  int64_t column;
  GENSERVE_DEVICE float operator[](int q) const { return rows[(q / k) * padded + column + q % k]; }
};

// Column o of a block's centre taps as packed (channel, row, column) rows, read in the centre window's
// (column, channel) order: where they are not in shared memory.
struct CentreColumn {
  const float* taps;  // the block's masked kernel at its first channel's centre row, column o
  int hidden;
  int64_t channel_rows;  // packed rows from one channel's taps to the next one's: R k
  int64_t ld;
  GENSERVE_DEVICE float operator[](int r) const { return taps[((r % hidden) * channel_rows + r / hidden) * ld]; }
};

// A (channels, rows, padded) cache of one slot moved up a row, the last row zero: each thread its own
// columns, top to bottom, so no thread reads what another writes.
GENSERVE_DEVICE void roll_cache(float* cache, int channels, int rows, int64_t padded, int thread, int threads) {
  for (int64_t i = thread; i < channels * padded; i += threads) {
    float* column = cache + (i / padded) * rows * padded + i % padded;
    for (int r = 0; r + 1 < rows; ++r) column[r * padded] = column[(r + 1) * padded];
    column[(rows - 1) * padded] = 0.f;
  }
}

// One block per slot, blockDim a multiple of 32; dynamic shared memory as plan_pixelcnn_shared_memory
// sized it.
GENSERVE_GLOBAL void pixelcnn_step_resident_kernel(const ResidentPixelCNNStep a) {
  GENSERVE_SHARED_FLOATS(shared);
  const int thread = GENSERVE_THREAD, threads = GENSERVE_THREADS;
  const int lane = thread % kSplit, group = thread / kSplit, groups = threads / kSplit;
  const int64_t s = GENSERVE_BLOCK;
  const int B = a.blocks, h = a.hidden, h2 = 2 * h, R = a.rows, p = R - 1, k = 2 * p + 1;
  const int R0 = a.r0, P0 = R0 - 1, K0 = 2 * P0 + 1, O = a.output_channels;
  const int64_t span = a.io.span, padded = a.width + 2 * p, padded0 = a.width + 2 * P0;
  const int64_t block_cache = static_cast<int64_t>(h) * R * padded;  // one slot's cache of one block
  float* const slot_image = a.image_rows + s * R0 * padded0;
  const auto slot_cache = [&](int b) { return a.block_rows[b] + s * block_cache; };

  if (a.roll) {
    roll_cache(slot_image, 1, R0, padded0, thread, threads);
    for (int b = 0; b < B; ++b) roll_cache(slot_cache(b), h, R, padded, thread, threads);
    GENSERVE_SYNC();  // the rolled caches are read below by other threads
  }
  // The weights into shared memory, the centre taps gathered from the packed kernels.
  const auto centre_source = [&](int64_t row) {  // row (b, column kk, channel c) of the gathered taps
    const int64_t b = row / (R * h), kk = row % (R * h) / h, c = row % h;
    return b * h * R * k + (c * R + p) * k + kk;
  };
  WeightView w[kPixelCNNStepWeights];
  w[kCentreW] = copy_weight(a.weights[kCentreW], shared, thread, threads, centre_source);
  GENSERVE_UNROLL
  for (int i = kCentreW + 1; i < kPixelCNNStepWeights; ++i) w[i] = copy_weight(a.weights[i], shared, thread, threads);
  const bool centre_shared = a.weights[kCentreW].shared_offset >= 0;
  const OutputLayers output_layers{w[kOutHiddenW], w[kOutHiddenB], w[kLogitsW], w[kLogitsB], h2, O};

  float* const image = shared;                                    // the slot's image rows, (R0, padded0)
  float* const above_rows = image + round_up4(R0 * padded0);      // (B, h, p, padded): the blocks' rows above
  float* const above = above_rows + round_up4(B * h * p * padded);  // (B, span, h): rows-above parts + bias
  float* const centre = above + round_up4(B * span * h);          // (B, p + span, h): centre rows, channels last
  float* const stream = centre + round_up4(B * (p + span) * h);   // the residual stream, 2h
  float* const active = stream + h2;                              // its relu, 2h
  float* const masked = active + h2;                              // a block's masked layer's output, h
  float* const out_hidden = masked + h;
  float* const logits = out_hidden + O;
  const int64_t col0 = a.io.positions[s] % a.width;
  for (int64_t i = thread; i < R0 * padded0; i += threads) image[i] = slot_image[i];
  for (int64_t i = thread; i < B * h * p * padded; i += threads) {  // rows 0..p-1 of each channel's cache
    const int64_t b = i / (h * p * padded), c = i / (p * padded) % h;
    above_rows[i] = slot_cache(static_cast<int>(b))[c * R * padded + i % (p * padded)];
  }
  for (int i = thread; i < B * p * h; i += threads) {  // the p centre-row columns left of the first pixel
    const int b = i / (p * h), u = i / h % p, c = i % h;
    centre[(b * (p + span) + u) * h + c] = slot_cache(b)[(c * R + p) * padded + col0 + u];
  }
  GENSERVE_SYNC();

  // Phase one: each block's rows-above part at each column t, output (b, c, t).
  const int above_in = h * p * k, above_outputs = B * h * static_cast<int>(span);
  for (int first = 0; first < above_outputs; first += groups) {
    const int o = first + group;
    const bool mine = o < above_outputs;
    const int b = mine ? o / (h * static_cast<int>(span)) : 0, c = o / static_cast<int>(span) % h;
    const int64_t t = o % span;
    float part = 0.f;
    if (mine) {
      const float* rows = above_rows + static_cast<int64_t>(b) * h * p * padded + col0 + t;
      const float* taps = a.masked_w + static_cast<int64_t>(b) * h * R * k * h + c;
      for (int i = lane; i < above_in; i += kSplit) {
        const int channel = i / (p * k), row = i / k % p, kk = i % k;
        part = fmaf(rows[(channel * p + row) * padded + kk], taps[static_cast<int64_t>((channel * R + row) * k + kk) * h],
                    part);
      }
    }
    const float sum = group_sum(part);
    if (lane == 0 && mine) above[(b * span + t) * h + c] = sum + w[kMaskedB].data[b * h + c];
  }
  // No barrier here: these parts are first read after the first pixel's input layer and its barrier,
  // and that layer touches nothing phase one does.

  // Phase two: the pixels.
  const float temperature = a.io.temperature[s];
  for (int64_t t = 0; t < span; ++t) {
    const int64_t j = col0 + t;
    const float draw = thread == 0 && !a.io.teacher ? a.io.noise[s * span + t] : 0.f;
    // The masked input layer on the image's window at column j (its taps from the pixel on are masked).
    dense_outputs(ImageWindow{image, padded0, K0, j}, R0 * K0, w[kInW], 0, h2, lane, group, groups,
                  [&](int o, float sum) {
                    stream[o] = sum + w[kInB].data[o];
                    active[o] = fmaxf(stream[o], 0.f);
                  });
    GENSERVE_SYNC();
    for (int b = 0; b < B; ++b) {
      float* const centre_b = centre + static_cast<int64_t>(b) * (p + span) * h;
      float* const cache_column = slot_cache(b) + static_cast<int64_t>(p) * padded + p + j;  // channel c at c R padded
      dense_outputs(active, h2, w[kReduceW], b * h2, h, lane, group, groups, [&](int c, float sum) {
        const float reduced = fmaxf(sum + w[kReduceB].data[b * h + c], 0.f);
        centre_b[(p + t) * h + c] = reduced;  // joins its row
        cache_column[c * R * padded] = reduced;
      });
      GENSERVE_SYNC();
      const float* above_b = above + (b * span + t) * h;
      const auto store_masked = [&](int c, float sum) { masked[c] = fmaxf(above_b[c] + sum, 0.f); };
      const float* window = centre_b + t * h;  // columns j - p .. j, channels last
      if (centre_shared) {
        dense_outputs(window, R * h, w[kCentreW], b * R * h, h, lane, group, groups, store_masked);
      } else {
        const float* taps = a.masked_w + (static_cast<int64_t>(b) * h * R * k + p * k) * h;
        dense_outputs_by(window, R * h, h, lane, group, groups,
                         [&](int c) { return CentreColumn{taps + c, h, static_cast<int64_t>(R) * k, h}; }, store_masked);
      }
      GENSERVE_SYNC();
      dense_outputs(masked, h, w[kExpandW], b * h, h2, lane, group, groups, [&](int o, float sum) {
        stream[o] = (stream[o] + sum) + w[kExpandB].data[b * h2 + o];
        active[o] = fmaxf(stream[o], 0.f);
      });
      GENSERVE_SYNC();
    }
    const int64_t value = output_pixel(a.io, output_layers, active, out_hidden, logits, s, t, draw, temperature,
                                       thread, lane, group, groups);
    if (thread == 0) {  // the pixel's value joins the image's row
      const float level = resident_level_value(value, a.io);
      image[P0 * padded0 + P0 + j] = level;
      slot_image[P0 * padded0 + P0 + j] = level;
    }
    GENSERVE_SYNC();
  }
}

}  // namespace genserve
