// The resident Gated step kernel's arguments and its shared-memory plan (gated_resident.cuh has the
// kernel): what the host code on either device (gated_resident_op.h) needs, without the kernel itself.
#pragma once

#include <cstdint>

#include "resident.h"

namespace genserve {

// The step's dense layers (in gated_step's packed order), in the order a block copies them into
// shared memory: the horizontal stacks' first (every layer of every pixel reads them).
enum GatedStepWeight { kH0W, kHW, kHoutW, kHoutB, kSkipW, kSkipB, kOhW, kOhB, kLgW, kLgB, kGatedStepWeights };

constexpr int kSkipRegisters = 32;  // skip weights a lane may hold: the skip layer's 8 * 32 inputs per output
constexpr int kLinkRegisters = 4;   // the next pixel's links a thread loads ahead (the rest: between pixels)

struct ResidentGatedStep {
  ResidentStepIO io;
  const float* links;        // (n, L, 2C, W)
  float* image_context;      // (n, p0 + 1), advanced in place
  float* hidden_context;     // (n, L - 1, p * C), advanced in place
  ResidentWeight weights[kGatedStepWeights];
  bool skip_in_registers;    // each group's lanes hold their output's skip weights
  int64_t width;
  int layers, channels, p0, p, output_channels;
};

// The activations a block keeps: the image context, this pixel's links, each later layer's window
// (p cached columns of the residual stream, then the current one) twice (this pixel's, and the next
// one's, into which the cached columns move), every layer's gated output, the output layers'.
GENSERVE_HOST_DEVICE int64_t activation_floats(const ResidentGatedStep& a) {
  const int64_t C = a.channels, L = a.layers, windows = 2 * (L - 1) * (a.p + 1) * C;
  return round_up4(a.p0 + 1) + round_up4(L * 2 * C + windows + L * C + C + a.output_channels + a.io.levels);
}

// For a block of `threads`: whether the skip weights go to registers, and where in `budget_bytes` of
// shared memory each other weight goes after the activations, in GatedStepWeight order, each that fits.
// Returns the bytes a block needs, or -1 if not even the activations fit.
inline int64_t plan_shared_memory(ResidentGatedStep& a, int threads, int64_t budget_bytes) {
  const int64_t budget = budget_bytes / static_cast<int64_t>(sizeof(float));
  a.skip_in_registers = a.channels <= threads / kSplit && a.layers * a.channels <= kSplit * kSkipRegisters;
  const int64_t used = activation_floats(a);
  if (used > budget) return -1;
  a.weights[kSkipW].held = a.skip_in_registers;
  return place_weights(a.weights, kGatedStepWeights, used, budget) * static_cast<int64_t>(sizeof(float));
}

}  // namespace genserve
