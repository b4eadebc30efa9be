// Device code the resident kernels (gated_resident.cuh, pixelcnn_resident.cuh) share: a block's weights
// copied into its shared memory, dense layers split over groups of kSplit lanes, and the choice.
//
// A dense layer's output is one group's: a lane sums every kSplit-th input, the group adds its partial
// sums by warp shuffles, and its first lane stores the output. A matrix whose rows are a multiple of 32
// floats is kept in shared memory with each row's columns permuted (column o of row r at o ^ 4 (r mod 8)):
// a group's 8 lanes read 8 rows of one column, which would otherwise all fall in one of the 32 banks;
// permuted, a warp's 32 reads hit 32 banks.
#pragma once

#include <cmath>
#include <cstdint>

#include "device.h"
#include "resident.h"

namespace genserve {

// A weight as a kernel reads it: from shared memory (its columns permuted or not) or global memory.
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

// This lane's part of x[0..rows) · column[0..rows) over every kSplit-th row. `x` and `column` are arrays or
// anything indexed like one (a window gathered on the fly, a column read through a map of its rows).
template <class Input, class Column>
GENSERVE_DEVICE float lane_sum(const Input& x, int rows, const Column& column, int lane) {
  float sum = 0.f;
  for (int r = lane; r < rows; r += kSplit) sum = fmaf(x[r], column[r], sum);
  return sum;
}

// A matrix's column from a lane's first row on, its rows ld floats apart.
struct StridedColumn {
  const float* data;
  int64_t ld;
  GENSERVE_DEVICE float operator[](int r) const { return data[r * ld]; }
};

// The same for two outputs at once: two independent chains of multiply-adds, each in lane_sum's order.
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

// store(o, x · column_of(o)) for every output o < outputs, by the block's groups of kSplit lanes. Every
// lane shuffles as often as every other (groups past the last output add zeros).
template <class Input, class ColumnOf, class Store>
GENSERVE_DEVICE void dense_outputs_by(const Input& x, int rows, int outputs, int lane, int group, int groups,
                                      ColumnOf column_of, Store store) {
  for (int first = 0; first < outputs; first += groups) {
    const int o = first + group;
    const float sum = group_sum(o < outputs ? lane_sum(x, rows, column_of(o), lane) : 0.f);
    if (lane == 0 && o < outputs) store(o, sum);
  }
}

// store(o, x · w[row0.., o]) for every output o < outputs.
template <class Input, class Store>
GENSERVE_DEVICE void dense_outputs(const Input& x, int rows, WeightView w, int row0, int outputs, int lane, int group,
                                   int groups, Store store) {
  dense_outputs_by(x, rows, outputs, lane, group, groups,
                   [&](int o) { return StridedColumn{lane_column(w, row0, o, lane), w.ld}; }, store);
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

// A step's output layers, from the features of its last residual layer: a relu'd hidden layer, then the
// logits.
struct OutputLayers {
  WeightView hidden_w, hidden_b, logits_w, logits_b;
  int features, hidden;
};

// Pixel `t` of slot `s` from `features`: the output layers (their activations in `out_hidden` and
// `logits`, a barrier after each), then thread 0 records the teacher's value and the logits, or chooses
// by the inverse CDF on `draw`, and writes the pixel. Returns the value on thread 0 (0 elsewhere).
GENSERVE_DEVICE int64_t output_pixel(const ResidentStepIO& io, const OutputLayers& out, const float* features,
                                     float* out_hidden, float* logits, int64_t s, int64_t t, float draw,
                                     float temperature, int thread, int lane, int group, int groups) {
  dense_outputs(features, out.features, out.hidden_w, 0, out.hidden, lane, group, groups,
                [&](int o, float sum) { out_hidden[o] = fmaxf(sum + out.hidden_b.data[o], 0.f); });
  GENSERVE_SYNC();
  dense_outputs(out_hidden, out.hidden, out.logits_w, 0, io.levels, lane, group, groups,
                [&](int o, float sum) { logits[o] = sum + out.logits_b.data[o]; });
  GENSERVE_SYNC();
  if (thread != 0) return 0;
  const int64_t index = s * io.span + t;
  int64_t value;
  if (io.teacher) {
    for (int v = 0; v < io.levels; ++v) io.logits_out[index * io.levels + v] = logits[v];
    value = io.teacher[index];
  } else {
    value = resident_choice(logits, io.levels, draw, temperature);
  }
  io.pixel[index] = value;
  return value;
}

// A level's value in [-1, 1], as csrc/kernels.h's level_value rounds it.
GENSERVE_DEVICE float resident_level_value(int64_t value, const ResidentStepIO& io) {
  return GENSERVE_MUL(static_cast<float>(value), io.level_scale) - 1.f;
}

// A weight's rows, source_row(r) of `from` for r < from.rows, into shared memory where the plan put it,
// by the block's threads, 8 loads in flight per thread (4 floats a load where the rows allow it).
// Returns how the kernel reads the weight: there, or where it is in global memory.
template <class SourceRow>
GENSERVE_DEVICE WeightView copy_weight(const ResidentWeight& from, float* shared, int thread, int threads,
                                       SourceRow source_row) {
  if (from.shared_offset < 0) return {from.data, static_cast<int>(from.cols), false};
  float* copy = shared + from.shared_offset;  // 16-byte aligned: offsets are multiples of 4 floats
  const int64_t cols = from.cols, size = from.rows * cols;
  // Where a permuted row's column o lies: o ^ 4(r mod 8) keeps each aligned group of 4 columns together.
  const auto place = [&](int64_t i) { return from.permuted ? i ^ (((i / cols) & 7) << 2) : i; };
  const auto source = [&](int64_t i) { return source_row(i / cols) * cols + i % cols; };
  if (reinterpret_cast<uintptr_t>(from.data) % 16 == 0 && cols % 4 == 0) {
    for (int64_t first = thread; first < size / 4; first += 8 * threads) {
      Float4 value[8];
      GENSERVE_UNROLL
      for (int u = 0; u < 8; ++u) {
        const int64_t i = 4 * (first + u * threads);
        value[u] = i < size ? *reinterpret_cast<const Float4*>(from.data + source(i)) : Float4{};
      }
      GENSERVE_UNROLL
      for (int u = 0; u < 8; ++u) {
        const int64_t i = 4 * (first + u * threads);
        if (i < size) *reinterpret_cast<Float4*>(copy + place(i)) = value[u];
      }
    }
  } else {
    for (int64_t first = thread; first < size; first += 8 * threads) {
      float value[8];
      GENSERVE_UNROLL
      for (int u = 0; u < 8; ++u) value[u] = first + u * threads < size ? from.data[source(first + u * threads)] : 0.f;
      GENSERVE_UNROLL
      for (int u = 0; u < 8; ++u)
        if (first + u * threads < size) copy[place(first + u * threads)] = value[u];
    }
  }
  return {copy, static_cast<int>(cols), from.permuted};
}

// The same for a weight copied as it is.
GENSERVE_DEVICE WeightView copy_weight(const ResidentWeight& from, float* shared, int thread, int threads) {
  return copy_weight(from, shared, thread, threads, [](int64_t row) { return row; });
}

}  // namespace genserve
