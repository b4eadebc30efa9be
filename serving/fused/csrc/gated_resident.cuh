// Gated PixelCNN's step with its weights resident on the chip: a kernel for small batches on a GPU.
//
// At batch 1 a step is a chain of small dependent products (per pixel, every layer's horizontal
// stack, gate and residual, then the output layers and the choice). The Triton step kernel reads
// each layer's weights from L2 at every pixel and pads the single slot to a 16-row tile; this one
// gives each slot a block that copies the weights into its shared memory once per call (the shipped
// model's 207 KB, 215 KB with the activations, of the 227 KB a block may have) but for the skip
// layer's, which its threads hold in registers, then steps `span` pixels. Every dense layer is split
// over groups of kSplit lanes (resident.cuh). Two barriers per layer (the gated outputs, then the
// residual stream), none per product. Nothing a pixel reads from global memory waits on the chain:
// the next pixel's links are loaded while this one's layers run, and staged in shared memory between
// pixels.
//
// Matrices are kept in shared memory with their columns permuted as resident.cuh describes.
//
// The same state tensors and packed weights as gated_step (csrc/gated_pixelcnn.cpp), the contexts
// updated in place. device.h compiles this source for a GPU (nvcc, resident_launch.cu) and for
// CPU threads (gated_resident.cpp), where the tests run it against the step graphs and naive sampling.
#pragma once

#include <cmath>
#include <cstdint>

#include "gated_resident.h"
#include "resident.cuh"

namespace genserve {

GENSERVE_DEVICE float resident_gate(float content, float gate) {  // as the other implementations write it
  return (1.f - 2.f / (expf(2.f * content) + 1.f)) * (1.f / (1.f + expf(-gate)));
}

// gated[c] = gate(link[c] + x · w[:, c], link[C + c] + x · w[:, C + c]) for c < C: a horizontal stack.
GENSERVE_DEVICE void gated_outputs(const float* x, int rows, WeightView w, int row0, int C, const float* link,
                                   float* gated, int lane, int group, int groups) {
  for (int first = 0; first < C; first += groups) {
    const int c = first + group;
    const bool mine = c < C;
    float content = 0.f, gate = 0.f;
    if (mine) lane_parts(x, rows, w, row0, c, C + c, lane, content, gate);
    content = group_sum(content);
    gate = group_sum(gate);
    if (lane == 0 && mine) gated[c] = resident_gate(link[c] + content, link[C + c] + gate);
  }
}

// One block per slot, blockDim a multiple of 32; dynamic shared memory as plan_shared_memory sized it.
GENSERVE_GLOBAL void gated_step_resident_kernel(const ResidentGatedStep a) {
  GENSERVE_SHARED_FLOATS(shared);
  const int thread = GENSERVE_THREAD, threads = GENSERVE_THREADS;
  const int lane = thread % kSplit, group = thread / kSplit, groups = threads / kSplit;
  const int64_t s = GENSERVE_BLOCK;
  const int C = a.channels, C2 = 2 * C, L = a.layers, P0 = a.p0, O = a.output_channels;
  const int cached = a.p * C, hidden = cached + C;  // a window: p cached columns, then the current one

  // The weights into shared memory, 8 loads in flight per thread.
  WeightView w[kGatedStepWeights];
  GENSERVE_UNROLL
  for (int k = 0; k < kGatedStepWeights; ++k) w[k] = copy_weight(a.weights[k], shared, thread, threads);
  const OutputLayers output_layers{w[kOhW], w[kOhB], w[kLgW], w[kLgB], C, O};
  // The skip weights of this lane's rows of its group's output, if held in registers.
  float skip_weights[kSkipRegisters];
  GENSERVE_UNROLL
  for (int j = 0; j < kSkipRegisters; ++j) {
    const int r = lane + j * kSplit;
    skip_weights[j] = a.skip_in_registers && group < C && r < L * C ? a.weights[kSkipW].data[r * C + group] : 0.f;
  }

  float* context = shared;                          // the row's last P0 + 1 pixel values
  float* links = context + round_up4(P0 + 1);       // this pixel's links, (L, 2C)
  float* windows = links + L * C2;                  // layer l's window at (l - 1) * hidden, l = 1..L-1, twice
  const int window_set = (L - 1) * hidden;          // pixel t's windows at windows + (t % 2) * window_set
  float* gated = windows + 2 * window_set;          // layer l's gated output at l * C
  float* skips = gated + L * C;
  float* out_hidden = skips + C;
  float* logits = out_hidden + O;
  // This slot's links (L * 2C rows of W columns) from its first pixel's column on.
  const float* slot_links = a.links + s * L * C2 * a.width + a.io.positions[s] % a.width;
  const auto link_at = [&](int i, int64_t t) { return slot_links[i * a.width + t]; };
  for (int i = thread; i <= P0; i += threads) context[i] = a.image_context[s * (P0 + 1) + i];
  for (int i = thread; i < L * C2; i += threads) links[i] = link_at(i, 0);
  for (int i = thread; i < (L - 1) * cached; i += threads)
    windows[i / cached * hidden + i % cached] = a.hidden_context[(s * (L - 1)) * cached + i];
  const float temperature = a.io.temperature[s];
  GENSERVE_SYNC();

  for (int64_t t = 0; t < a.io.span; ++t) {
    float* const now = windows + (t % 2) * window_set;
    float* const next = windows + (1 - t % 2) * window_set;
    const bool another = t + 1 < a.io.span;
    float next_links[kLinkRegisters];  // loaded now, used once this pixel's are no longer read
    GENSERVE_UNROLL
    for (int j = 0; j < kLinkRegisters; ++j) {
      const int i = thread + j * threads;
      next_links[j] = another && i < L * C2 ? link_at(i, t + 1) : 0.f;
    }
    const float draw = thread == 0 && !a.io.teacher ? a.io.noise[s * a.io.span + t] : 0.f;

    gated_outputs(context, P0 + 1, w[kH0W], 0, C, links, gated, lane, group, groups);
    GENSERVE_SYNC();
    for (int l = 1; l < L; ++l) {
      // The residual stream entering layer l, into its window: layer l-1's output 1x1 (and bias), plus
      // the stream entering layer l-1 (none before layer 1).
      float* window = now + (l - 1) * hidden;
      const float* before = l > 1 ? now + (l - 2) * hidden + cached : nullptr;
      const float* bias = w[kHoutB].data + (l - 1) * C;
      dense_outputs(gated + (l - 1) * C, C, w[kHoutW], (l - 1) * C, C, lane, group, groups,
                    [&](int o, float sum) { window[cached + o] = (before ? before[o] : 0.f) + (sum + bias[o]); });
      GENSERVE_SYNC();
      gated_outputs(window, hidden, w[kHW], (l - 1) * hidden, C, links + l * C2, gated + l * C, lane, group,
                    groups);
      GENSERVE_SYNC();
    }
    const auto store_skip = [&](int o, float sum) { skips[o] = fmaxf(sum + w[kSkipB].data[o], 0.f); };
    if (a.skip_in_registers) {  // the same products in the same order as lane_sum's
      float part = 0.f;
      GENSERVE_UNROLL
      for (int j = 0; j < kSkipRegisters; ++j)
        if (lane + j * kSplit < L * C) part = fmaf(gated[lane + j * kSplit], skip_weights[j], part);
      const float sum = group_sum(part);
      if (lane == 0 && group < C) store_skip(group, sum);
    } else {
      dense_outputs(gated, L * C, w[kSkipW], 0, C, lane, group, groups, store_skip);
    }
    GENSERVE_SYNC();
    const int64_t value = output_pixel(a.io, output_layers, skips, out_hidden, logits, s, t, draw, temperature,
                                       thread, lane, group, groups);
    if (thread == 0) {
      for (int i = 0; i < P0; ++i) context[i] = context[i + 1];
      context[P0] = resident_level_value(value, a.io);
    }
    // The next pixel's windows: these, less their oldest column (its current one is written then).
    for (int i = thread; i < (L - 1) * cached; i += threads) {
      const int at = i / cached * hidden + i % cached;
      next[at] = now[at + C];
    }
    if (another) {  // this pixel's links were last read before the barriers above
      GENSERVE_UNROLL
      for (int j = 0; j < kLinkRegisters; ++j)
        if (thread + j * threads < L * C2) links[thread + j * threads] = next_links[j];
      for (int i = thread + kLinkRegisters * threads; i < L * C2; i += threads) links[i] = link_at(i, t + 1);
    }
    GENSERVE_SYNC();
  }
  for (int i = thread; i <= P0; i += threads) a.image_context[s * (P0 + 1) + i] = context[i];
  const float* last = windows + (a.io.span % 2) * window_set;  // what the last pixel left for the next
  for (int i = thread; i < (L - 1) * cached; i += threads)
    a.hidden_context[(s * (L - 1)) * cached + i] = last[i / cached * hidden + i % cached];
}

}  // namespace genserve
