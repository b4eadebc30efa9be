// Gated PixelCNN's step with its weights resident in shared memory: a kernel for small batches on a GPU.
//
// At batch 1 a step is a chain of small dependent products (per pixel, every layer's horizontal
// stack, gate and residual, then the output layers and the choice). The Triton step kernel reads
// each layer's weights from L2 at every pixel and pads the single slot to a 16-row tile; this one
// gives each slot a block that copies the weights into its shared memory once per call (the shipped
// model's horizontal stacks, residual and output layers: 212 KB of the 227 KB a block may have; what
// does not fit, the skip layer's 32 KB, is read from global memory), then steps `span` pixels
// with every dense layer split over groups of kSplit lanes: a lane sums every kSplit-th input of one
// output, the group adds its partial sums by warp shuffles, and its first lane stores the output.
// Two barriers per layer (the gated outputs, then the residual stream), none per product.
//
// The same state tensors and packed weights as gated_step (csrc/gated_pixelcnn.cpp), the contexts
// updated in place. device.h compiles this source for a GPU (nvcc, cuda/gated_resident.cu) and for
// CPU threads (gated_resident.cpp), where the tests run it against the step graphs and naive sampling.
#pragma once

#include <cmath>
#include <cstdint>

#include "device.h"

namespace genserve {

// The step's dense layers (in gated_step's packed order), in the order a block copies them into
// shared memory: the horizontal stacks' first (every layer of every pixel reads them).
enum GatedStepWeight { kH0W, kHW, kHoutW, kHoutB, kSkipW, kSkipB, kOhW, kOhB, kLgW, kLgB, kGatedStepWeights };

constexpr int kSplit = 8;  // lanes per output: a product over K inputs is K/8 dependent multiply-adds

struct ResidentGatedStep {
  const int64_t* positions;  // (n, 1)
  const float* noise;        // (n, span, 1)
  const float* temperature;  // (n, 1)
  const float* links;        // (n, L, 2C, W)
  float* image_context;      // (n, p0 + 1), advanced in place
  float* hidden_context;     // (n, L - 1, p * C), advanced in place
  const int64_t* teacher;    // (n, span, 1) or null
  int64_t* pixel;            // (n, span, 1)
  float* logits_out;         // (n, span, levels) where a teacher is given
  const float* weights[kGatedStepWeights];
  int64_t weight_floats[kGatedStepWeights];
  int64_t shared_offset[kGatedStepWeights];  // where a block keeps each, in floats; -1: read from global memory
  int64_t n, span, width;
  int layers, channels, p0, p, output_channels, levels;
  float level_scale;
};

GENSERVE_HOST_DEVICE int64_t round_up4(int64_t floats) { return (floats + 3) / 4 * 4; }

// The activations a block keeps: the image context, each later layer's window (p cached columns of
// the residual stream, then the current one), every layer's gated output, the output layers'.
inline int64_t activation_floats(const ResidentGatedStep& a) {
  const int64_t C = a.channels, L = a.layers;
  return round_up4(a.p0 + 1) + round_up4((L - 1) * (a.p + 1) * C + L * C + C + a.output_channels + a.levels);
}

// Places the weights in `budget_bytes` of shared memory after the activations, in GatedStepWeight
// order, each that fits; returns the bytes a block needs, or -1 if not even the activations fit.
inline int64_t plan_shared_memory(ResidentGatedStep& a, int64_t budget_bytes) {
  const int64_t budget = budget_bytes / static_cast<int64_t>(sizeof(float));
  int64_t used = activation_floats(a);
  if (used > budget) return -1;
  for (int k = 0; k < kGatedStepWeights; ++k) {
    const int64_t size = round_up4(a.weight_floats[k]);
    a.shared_offset[k] = used + size <= budget ? used : -1;
    if (a.shared_offset[k] >= 0) used += size;
  }
  return used * static_cast<int64_t>(sizeof(float));
}

GENSERVE_DEVICE float resident_gate(float content, float gate) {  // as the other implementations write it
  return (1.f - 2.f / (expf(2.f * content) + 1.f)) * (1.f / (1.f + expf(-gate)));
}

// This lane's part of x[0..rows) · w[:, o] (w row-major, `ld` columns): every kSplit-th input.
GENSERVE_DEVICE float lane_part(const float* x, int rows, const float* w, int ld, int o, int lane) {
  float sum = 0.f;
  for (int r = lane; r < rows; r += kSplit) sum = fmaf(x[r], w[r * ld + o], sum);
  return sum;
}

// The group's kSplit parts added by a butterfly: every lane ends with the same sum, bit for bit
// (each addition's two operands are the same pair on both lanes that make it).
GENSERVE_DEVICE float group_sum(float part) {
  GENSERVE_UNROLL
  for (int mask = kSplit / 2; mask > 0; mask /= 2) part += GENSERVE_SHUFFLE_XOR(part, mask);
  return part;
}

// store(o, x · w[:, o]) for every output o < outputs, by the block's groups of kSplit lanes. Every
// lane shuffles as often as every other (groups past the last output add zeros).
template <class Store>
GENSERVE_DEVICE void dense_outputs(const float* x, int rows, const float* w, int outputs, int lane, int group,
                                   int groups, Store store) {
  for (int first = 0; first < outputs; first += groups) {
    const int o = first + group;
    const float sum = group_sum(o < outputs ? lane_part(x, rows, w, outputs, o, lane) : 0.f);
    if (lane == 0 && o < outputs) store(o, sum);
  }
}

// gated[c] = gate(link content + x · w[:, c], link gate + x · w[:, C + c]) for c < C: a horizontal stack.
GENSERVE_DEVICE void gated_outputs(const float* x, int rows, const float* w, int C, const float* link,
                                   int64_t link_stride, float* gated, int lane, int group, int groups) {
  for (int first = 0; first < C; first += groups) {
    const int c = first + group;
    const bool mine = c < C;
    const float content = group_sum(mine ? lane_part(x, rows, w, 2 * C, c, lane) : 0.f);
    const float gate = group_sum(mine ? lane_part(x, rows, w, 2 * C, C + c, lane) : 0.f);
    if (lane == 0 && mine)
      gated[c] = resident_gate(link[c * link_stride] + content, link[(C + c) * link_stride] + gate);
  }
}

// The inverse-CDF choice as csrc/kernels.h's choose_level makes it (the same order of operations).
GENSERVE_DEVICE int64_t resident_choice(const float* logits, int levels, float noise, float temperature) {
  int best = 0;
  for (int v = 1; v < levels; ++v)
    if (logits[v] > logits[best]) best = v;
  if (temperature == 0.f) return best;
  const float top = logits[best] / temperature;
  float total = 0.f;
  for (int v = 0; v < levels; ++v) total += expf(logits[v] / temperature - top);
  int chosen = 0;
  float cdf = 0.f;
  for (; chosen + 1 < levels; ++chosen) {
    cdf += expf(logits[chosen] / temperature - top) / total;
    if (!(cdf < noise)) break;
  }
  return chosen;
}

// One block per slot, blockDim a multiple of 32; dynamic shared memory as plan_shared_memory sized it.
GENSERVE_GLOBAL void gated_step_resident_kernel(const ResidentGatedStep a) {
  GENSERVE_SHARED_FLOATS(shared);
  const int thread = GENSERVE_THREAD, threads = GENSERVE_THREADS;
  const int lane = thread % kSplit, group = thread / kSplit, groups = threads / kSplit;
  const int64_t s = GENSERVE_BLOCK;
  const int C = a.channels, C2 = 2 * C, L = a.layers, P0 = a.p0, O = a.output_channels, V = a.levels;
  const int cached = a.p * C, hidden = cached + C;  // a window: p cached columns, then the current one

  const float* w[kGatedStepWeights];
  GENSERVE_UNROLL
  for (int k = 0; k < kGatedStepWeights; ++k) {
    w[k] = a.weights[k];
    if (a.shared_offset[k] < 0) continue;
    float* copy = shared + a.shared_offset[k];
    for (int64_t i = thread; i < a.weight_floats[k]; i += threads) copy[i] = a.weights[k][i];
    w[k] = copy;
  }
  float* context = shared;                         // the row's last P0 + 1 pixel values
  float* windows = context + round_up4(P0 + 1);    // layer l's window at (l - 1) * hidden, l = 1..L-1
  float* gated = windows + (L - 1) * hidden;       // layer l's gated output at l * C
  float* skips = gated + L * C;
  float* out_hidden = skips + C;
  float* logits = out_hidden + O;
  for (int i = thread; i <= P0; i += threads) context[i] = a.image_context[s * (P0 + 1) + i];
  for (int i = thread; i < (L - 1) * cached; i += threads)
    windows[i / cached * hidden + i % cached] = a.hidden_context[(s * (L - 1)) * cached + i];
  const int64_t column0 = a.positions[s] % a.width;
  const float temperature = a.temperature[s];
  const int64_t link_stride = a.width;  // links (L, 2C, W) of this slot: (layer, channel) rows of W columns
  GENSERVE_SYNC();

  for (int64_t t = 0; t < a.span; ++t) {
    const float* link = a.links + s * L * C2 * a.width + column0 + t;
    gated_outputs(context, P0 + 1, w[kH0W], C, link, link_stride, gated, lane, group, groups);
    GENSERVE_SYNC();
    for (int l = 1; l < L; ++l) {
      // The residual stream entering layer l, into its window: layer l-1's output 1x1 (and bias), plus
      // the stream entering layer l-1 (none before layer 1).
      float* window = windows + (l - 1) * hidden;
      const float* before = l > 1 ? windows + (l - 2) * hidden + cached : nullptr;
      const float* bias = w[kHoutB] + (l - 1) * C;
      dense_outputs(gated + (l - 1) * C, C, w[kHoutW] + (l - 1) * C * C, C, lane, group, groups,
                    [&](int o, float sum) { window[cached + o] = (before ? before[o] : 0.f) + (sum + bias[o]); });
      GENSERVE_SYNC();
      gated_outputs(window, hidden, w[kHW] + (l - 1) * hidden * C2, C, link + l * C2 * link_stride, link_stride,
                    gated + l * C, lane, group, groups);
      GENSERVE_SYNC();
    }
    dense_outputs(gated, L * C, w[kSkipW], C, lane, group, groups,
                  [&](int o, float sum) { skips[o] = fmaxf(sum + w[kSkipB][o], 0.f); });
    GENSERVE_SYNC();
    dense_outputs(skips, C, w[kOhW], O, lane, group, groups,
                  [&](int o, float sum) { out_hidden[o] = fmaxf(sum + w[kOhB][o], 0.f); });
    GENSERVE_SYNC();
    dense_outputs(out_hidden, O, w[kLgW], V, lane, group, groups,
                  [&](int o, float sum) { logits[o] = sum + w[kLgB][o]; });
    GENSERVE_SYNC();
    if (thread == 0) {
      const int64_t index = s * a.span + t;
      int64_t value;
      if (a.teacher) {
        for (int v = 0; v < V; ++v) a.logits_out[index * V + v] = logits[v];
        value = a.teacher[index];
      } else {
        value = resident_choice(logits, V, a.noise[index], temperature);
      }
      a.pixel[index] = value;
      for (int i = 0; i < P0; ++i) context[i] = context[i + 1];
      context[P0] = GENSERVE_MUL(static_cast<float>(value), a.level_scale) - 1.f;  // as level_value
    }
    // Each window drops its oldest column, a block of entries at a time: every read of a block
    // before any of its writes; a later block reads only entries no earlier block writes.
    for (int first = 0; first < (L - 1) * cached; first += threads) {
      const int i = first + thread;
      const bool mine = i < (L - 1) * cached;
      const int at = i / cached * hidden + i % cached;
      const float moved = mine ? windows[at + C] : 0.f;
      GENSERVE_SYNC();
      if (mine) windows[at] = moved;
    }
    GENSERVE_SYNC();
  }
  for (int i = thread; i <= P0; i += threads) a.image_context[s * (P0 + 1) + i] = context[i];
  for (int i = thread; i < (L - 1) * cached; i += threads)
    a.hidden_context[(s * (L - 1)) * cached + i] = windows[i / cached * hidden + i % cached];
}

}  // namespace genserve
