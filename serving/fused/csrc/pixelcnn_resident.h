// The resident PixelCNN step kernel's arguments and its shared-memory plan (pixelcnn_resident.cuh has
// the kernel): what the host code on either device (pixelcnn_resident_op.h) needs, without the kernel.
#pragma once

#include <cstdint>

#include "resident.h"

namespace genserve {

// The weights a block keeps in shared memory, in the order it places them: the per-pixel matrices
// first. kCentreW is the residual blocks' masked kernels cut to their centre rows' taps up to the
// centre (the rest are masked: zero), gathered as (column, channel) rows; their rows-above taps are
// read from global memory once per call.
enum PixelCNNStepWeight {
  kCentreW, kReduceW, kExpandW, kOutHiddenW, kInW, kLogitsW,
  kInB, kReduceB, kMaskedB, kExpandB, kOutHiddenB, kLogitsB, kPixelCNNStepWeights
};

constexpr int kMaxResidentBlocks = 32;  // residual blocks whose caches a call takes

struct ResidentPixelCNNStep {
  ResidentStepIO io;
  float* image_rows;         // (n, 1, r0, W + 2(r0 - 1)), written in place
  float* block_rows[kMaxResidentBlocks];  // each (n, h, R, W + 2p), written in place
  const float* masked_w;     // (blocks, h R k, h): the masked kernels as packed
  ResidentWeight weights[kPixelCNNStepWeights];
  bool roll;                 // every cache moves up a row first (the refresh): calls that start rows
  int64_t width;
  int blocks, hidden, r0, rows, output_channels;  // rows: R = p + 1 of a block's cache
};

// The activations a block keeps: the image's rows, each block's rows above (for the call's first
// phase), each block's rows-above part of its masked layer at every stepped column, each block's centre
// row (channels last) from p columns left of the call's first pixel, the residual stream and its relu,
// a block's masked output, the output layers'.
GENSERVE_HOST_DEVICE int64_t pixelcnn_activation_floats(const ResidentPixelCNNStep& a) {
  const int64_t B = a.blocks, h = a.hidden, p = a.rows - 1, padded = a.width + 2 * p;
  const int64_t image = a.r0 * (a.width + 2 * (a.r0 - 1));
  return round_up4(image) + round_up4(B * h * p * padded) + round_up4(B * a.io.span * h) +
         round_up4(B * (p + a.io.span) * h) + round_up4(4 * h + h + a.output_channels + a.io.levels);
}

// Where in `budget_bytes` of shared memory each weight goes after the activations, in
// PixelCNNStepWeight order, each that fits. Returns the bytes a block needs, or -1 if not even the
// activations fit.
inline int64_t plan_pixelcnn_shared_memory(ResidentPixelCNNStep& a, int64_t budget_bytes) {
  const int64_t budget = budget_bytes / static_cast<int64_t>(sizeof(float));
  const int64_t used = pixelcnn_activation_floats(a);
  if (used > budget) return -1;
  return place_weights(a.weights, kPixelCNNStepWeights, used, budget) * static_cast<int64_t>(sizeof(float));
}

}  // namespace genserve
