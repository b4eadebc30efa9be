// Gated PixelCNN's step with its weights resident on the chip: a kernel for small batches on a GPU.
//
// At batch 1 a step is a chain of small dependent products (per pixel, every layer's horizontal
// stack, gate and residual, then the output layers and the choice). The Triton step kernel reads
// each layer's weights from L2 at every pixel and pads the single slot to a 16-row tile; this one
// gives each slot a block that copies the weights into its shared memory once per call (the shipped
// model's 207 KB, 215 KB with the activations, of the 227 KB a block may have) but for the skip
// layer's, which its threads hold in registers, then steps `span` pixels. Every dense layer is split over groups of kSplit lanes: a lane
// sums every kSplit-th input of one output, the group adds its partial sums by warp shuffles, and its
// first lane stores the output. Two barriers per layer (the gated outputs, then the residual stream),
// none per product. Nothing a pixel reads from global memory waits on the chain: the next pixel's
// links are loaded while this one's layers run, and staged in shared memory between pixels.
//
// A matrix whose rows are a multiple of 32 floats is kept in shared memory with each row's columns
// permuted (column o of row r at o ^ 4 (r mod 8)): a group's 8 lanes read 8 rows of one column,
// which would otherwise all fall in one of the 32 banks; permuted, a warp's 32 reads hit 32 banks.
//
// The same state tensors and packed weights as gated_step (csrc/gated_pixelcnn.cpp), the contexts
// updated in place. device.h compiles this source for a GPU (nvcc, gated_resident_launch.cu) and for
// CPU threads (gated_resident.cpp), where the tests run it against the step graphs and naive sampling.
#pragma once

#include <cmath>
#include <cstdint>

#include "device.h"
#include "gated_resident.h"

namespace genserve {

GENSERVE_DEVICE float resident_gate(float content, float gate) {  // as the other implementations write it
  return (1.f - 2.f / (expf(2.f * content) + 1.f)) * (1.f / (1.f + expf(-gate)));
}

// A weight as the kernel reads it: from shared memory (its columns permuted or not) or global memory.
struct WeightView {
  const float* data;
  int ld;
  bool permuted;
};

// Where this lane reads column o of rows row0 + r, r = lane (mod 8): lane q reads rows r ≡ q (mod 8),
// so its permutation of the columns is the same at every row it reads.
GENSERVE_DEVICE const float* lane_column(WeightView w, int row0, int o, int lane) {
  static_assert(kSplit == 8, "the columns' permutation pairs a lane with rows r = lane (mod 8)");
  return w.data + static_cast<int64_t>(row0) * w.ld + (w.permuted ? o ^ (((row0 + lane) & 7) << 2) : o);
}

// This lane's part of x[0..rows) · w[row0 + r, o] over every kSplit-th r.
GENSERVE_DEVICE float lane_part(const float* x, int rows, WeightView w, int row0, int o, int lane) {
  const float* weights = lane_column(w, row0, o, lane);
  float sum = 0.f;
  for (int r = lane; r < rows; r += kSplit) sum = fmaf(x[r], weights[static_cast<int64_t>(r) * w.ld], sum);
  return sum;
}

// The same for two outputs at once: two independent chains of multiply-adds, each in lane_part's order.
GENSERVE_DEVICE void lane_parts(const float* x, int rows, WeightView w, int row0, int o1, int o2, int lane,
                                float& sum1, float& sum2) {
  const float *weights1 = lane_column(w, row0, o1, lane), *weights2 = lane_column(w, row0, o2, lane);
  sum1 = sum2 = 0.f;
  for (int r = lane; r < rows; r += kSplit) {
    const float input = x[r];
    sum1 = fmaf(input, weights1[static_cast<int64_t>(r) * w.ld], sum1);
    sum2 = fmaf(input, weights2[static_cast<int64_t>(r) * w.ld], sum2);
  }
}

// The group's kSplit parts added by a butterfly: every lane ends with the same sum, bit for bit
// (each addition's two operands are the same pair on both lanes that make it).
GENSERVE_DEVICE float group_sum(float part) {
  GENSERVE_UNROLL
  for (int mask = kSplit / 2; mask > 0; mask /= 2) part += GENSERVE_SHUFFLE_XOR(part, mask);
  return part;
}

// store(o, x · w[row0.., o]) for every output o < outputs, by the block's groups of kSplit lanes. Every
// lane shuffles as often as every other (groups past the last output add zeros).
template <class Store>
GENSERVE_DEVICE void dense_outputs(const float* x, int rows, WeightView w, int row0, int outputs, int lane,
                                   int group, int groups, Store store) {
  for (int first = 0; first < outputs; first += groups) {
    const int o = first + group;
    const float sum = group_sum(o < outputs ? lane_part(x, rows, w, row0, o, lane) : 0.f);
    if (lane == 0 && o < outputs) store(o, sum);
  }
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

  // The weights into shared memory, 8 loads in flight per thread.
  WeightView w[kGatedStepWeights];
  GENSERVE_UNROLL
  for (int k = 0; k < kGatedStepWeights; ++k) {
    const ResidentWeight& from = a.weights[k];
    w[k] = {from.data, static_cast<int>(from.cols), false};
    if (from.shared_offset < 0) continue;
    float* copy = shared + from.shared_offset;  // 16-byte aligned: offsets are multiples of 4 floats
    const int64_t size = from.rows * from.cols;
    // Where a permuted row's column o lies: o ^ 4(r mod 8) keeps each aligned group of 4 columns together.
    const auto place = [&](int64_t i) { return from.permuted ? i ^ (((i / from.cols) & 7) << 2) : i; };
    if (reinterpret_cast<uintptr_t>(from.data) % 16 == 0 && size % 4 == 0 && from.cols % 4 == 0) {
      const Float4* source = reinterpret_cast<const Float4*>(from.data);  // 4 floats a load
      for (int64_t first = thread; first < size / 4; first += 8 * threads) {
        Float4 value[8];
        GENSERVE_UNROLL
        for (int u = 0; u < 8; ++u) value[u] = first + u * threads < size / 4 ? source[first + u * threads] : Float4{};
        GENSERVE_UNROLL
        for (int u = 0; u < 8; ++u)
          if (first + u * threads < size / 4)
            *reinterpret_cast<Float4*>(copy + place(4 * (first + u * threads))) = value[u];
      }
    } else {
      for (int64_t first = thread; first < size; first += 8 * threads) {
        float value[8];
        GENSERVE_UNROLL
        for (int u = 0; u < 8; ++u) value[u] = first + u * threads < size ? from.data[first + u * threads] : 0.f;
        GENSERVE_UNROLL
        for (int u = 0; u < 8; ++u)
          if (first + u * threads < size) copy[place(first + u * threads)] = value[u];
      }
    }
    w[k] = {copy, static_cast<int>(from.cols), from.permuted};
  }
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
  const float* slot_links = a.links + s * L * C2 * a.width + a.positions[s] % a.width;
  const auto link_at = [&](int i, int64_t t) { return slot_links[i * a.width + t]; };
  for (int i = thread; i <= P0; i += threads) context[i] = a.image_context[s * (P0 + 1) + i];
  for (int i = thread; i < L * C2; i += threads) links[i] = link_at(i, 0);
  for (int i = thread; i < (L - 1) * cached; i += threads)
    windows[i / cached * hidden + i % cached] = a.hidden_context[(s * (L - 1)) * cached + i];
  const float temperature = a.temperature[s];
  GENSERVE_SYNC();

  for (int64_t t = 0; t < a.span; ++t) {
    float* const now = windows + (t % 2) * window_set;
    float* const next = windows + (1 - t % 2) * window_set;
    const int64_t index = s * a.span + t;
    const bool another = t + 1 < a.span;
    float next_links[kLinkRegisters];  // loaded now, used once this pixel's are no longer read
    GENSERVE_UNROLL
    for (int j = 0; j < kLinkRegisters; ++j) {
      const int i = thread + j * threads;
      next_links[j] = another && i < L * C2 ? link_at(i, t + 1) : 0.f;
    }
    const float draw = thread == 0 && !a.teacher ? a.noise[index] : 0.f;

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
    if (a.skip_in_registers) {  // the same products in the same order as lane_part's
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
    dense_outputs(skips, C, w[kOhW], 0, O, lane, group, groups,
                  [&](int o, float sum) { out_hidden[o] = fmaxf(sum + w[kOhB].data[o], 0.f); });
    GENSERVE_SYNC();
    dense_outputs(out_hidden, O, w[kLgW], 0, V, lane, group, groups,
                  [&](int o, float sum) { logits[o] = sum + w[kLgB].data[o]; });
    GENSERVE_SYNC();
    if (thread == 0) {
      int64_t value;
      if (a.teacher) {
        for (int v = 0; v < V; ++v) a.logits_out[index * V + v] = logits[v];
        value = a.teacher[index];
      } else {
        value = resident_choice(logits, V, draw, temperature);
      }
      a.pixel[index] = value;
      for (int i = 0; i < P0; ++i) context[i] = context[i + 1];
      context[P0] = GENSERVE_MUL(static_cast<float>(value), a.level_scale) - 1.f;  // as level_value
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
  const float* last = windows + (a.span % 2) * window_set;  // what the last pixel left for the next
  for (int i = thread; i < (L - 1) * cached; i += threads)
    a.hidden_context[(s * (L - 1)) * cached + i] = last[i / cached * hidden + i % cached];
}

}  // namespace genserve
