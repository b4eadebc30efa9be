// Building blocks of the fused CPU sampling steps: small dense layers, gates and the pixel choice.
//
// Sizes here are tiny (tens to hundreds of features) and rows few (one per slot, or per slot
// and column), so a BLAS call costs more in dispatch than in arithmetic. These loops are
// written for the compiler to vectorise (GCC vector extensions, compiled with -march=native):
// register tiles of R rows by V vectors of 8 outputs, with R * V >= 8 independent accumulator
// chains so a batch-1 matrix-vector product is not bound by FMA latency.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace genserve {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// y[r, o0 : o0 + 8V] = (accumulate ? y : 0) + bias + sum_i x[r, i] * w[i, o] for R rows. The sum
// over i is split S ways (partial sums added at the end), so that R * V * S >= 8 chains run at once.
template <int R, int V, int S>
inline void dense_tile(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, int64_t o0,
                       const float* bias, float* y, int64_t ldy, bool accumulate) {
  v8 acc[S][R][V];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[s][r][v] = splat(0.f);
  int64_t i = 0;
  for (; i + S <= in; i += S)
    for (int s = 0; s < S; ++s) {
      const float* wi = w + (i + s) * out + o0;
      v8 wv[V];
      for (int v = 0; v < V; ++v) wv[v] = load8(wi + 8 * v);
      for (int r = 0; r < R; ++r) {
        v8 xr = splat(x[r * ldx + i + s]);
        for (int v = 0; v < V; ++v) acc[s][r][v] += xr * wv[v];
      }
    }
  for (; i < in; ++i) {
    const float* wi = w + i * out + o0;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[0][r][v] += splat(x[r * ldx + i]) * load8(wi + 8 * v);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      v8 total = accumulate ? load8(y + r * ldy + o0 + 8 * v) : splat(0.f);
      if (bias) total += load8(bias + o0 + 8 * v);
      for (int s = 0; s < S; ++s) total += acc[s][r][v];
      store8(y + r * ldy + o0 + 8 * v, total);
    }
}

// Outputs past the last multiple of 8 (e.g. two pixel levels): four partial sums per output.
inline void dense_tail(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, int64_t o0,
                       const float* bias, float* y, int64_t ldy, int64_t rows, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = o0; o < out; ++o) {
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t i = 0;
      for (; i + 4 <= in; i += 4)
        for (int s = 0; s < 4; ++s) part[s] += x[r * ldx + i + s] * w[(i + s) * out + o];
      for (; i < in; ++i) part[0] += x[r * ldx + i] * w[i * out + o];
      y[r * ldy + o] = (accumulate ? y[r * ldy + o] : 0.f) + (bias ? bias[o] : 0.f) + ((part[0] + part[1]) +
                                                                                      (part[2] + part[3]));
    }
}

// R rows: the widest tile that fits, then 8 outputs at a time, then the tail.
template <int R, int V, int S>
inline void dense_rows(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, const float* bias,
                       float* y, int64_t ldy, bool accumulate) {
  int64_t o0 = 0;
  for (; o0 + 8 * V <= out; o0 += 8 * V) dense_tile<R, V, S>(x, ldx, w, in, out, o0, bias, y, ldy, accumulate);
  for (; o0 + 8 <= out; o0 += 8) dense_tile<R, 1, 8 / R>(x, ldx, w, in, out, o0, bias, y, ldy, accumulate);
  if (o0 < out) dense_tail(x, ldx, w, in, out, o0, bias, y, ldy, R, accumulate);
}

// A dense layer over `rows` rows: y = (accumulate ? y : 0) + bias + x w, with w stored (in, out).
// bias may be null. x rows are ldx apart, y rows ldy apart.
inline void dense(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, const float* bias, float* y,
                  int64_t ldy, int64_t rows, bool accumulate = false) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) dense_rows<6, 2, 1>(x + r * ldx, ldx, w, in, out, bias, y + r * ldy, ldy, accumulate);
  for (; r + 4 <= rows; r += 4) dense_rows<4, 2, 1>(x + r * ldx, ldx, w, in, out, bias, y + r * ldy, ldy, accumulate);
  if (rows - r >= 2) {
    dense_rows<2, 4, 1>(x + r * ldx, ldx, w, in, out, bias, y + r * ldy, ldy, accumulate);
    r += 2;
  }
  if (r < rows) {
    // One row: the widest tile that fits `out`, the rest of the 8 chains from splitting the sum.
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    if (out >= 64) dense_rows<1, 8, 1>(xr, ldx, w, in, out, bias, yr, ldy, accumulate);
    else if (out >= 32) dense_rows<1, 4, 2>(xr, ldx, w, in, out, bias, yr, ldy, accumulate);
    else if (out >= 16) dense_rows<1, 2, 4>(xr, ldx, w, in, out, bias, yr, ldy, accumulate);
    else dense_rows<1, 1, 8>(xr, ldx, w, in, out, bias, yr, ldy, accumulate);
  }
}

// exp on 8 lanes (Cephes' expf polynomial, ~1 ulp), inputs clamped to the finite range.
inline v8 exp8(v8 x) {
  const v8 hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v8 magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  v8 t = x * splat(1.44269504088896341f) + magic;
  v8 n = t - magic;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  v8 y = p * r * r + r + splat(1.f);
  v8i tn, mn;
  std::memcpy(&tn, &t, sizeof t);
  std::memcpy(&mn, &magic, sizeof magic);
  v8i bits = ((tn - mn) + 127) << 23;  // 2^n
  v8 scale;
  std::memcpy(&scale, &bits, sizeof bits);
  return y * scale;
}

inline float exp1(float x) {
  float lanes[8] = {x};
  v8 v = exp8(load8(lanes));
  return v[0];
}

// Gated activation over rows: out[r, c] = tanh(pre[r, c]) * sigmoid(pre[r, C + c]), c < C.
// tanh(a) = 1 - 2 / (exp(2a) + 1) and sigmoid(b) = 1 / (1 + exp(-b)): absolute error ~1e-7.
inline void gate_rows(const float* pre, int64_t ldpre, float* out, int64_t ldout, int64_t channels, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* content = pre + r * ldpre;
    const float* logits = content + channels;
    float* o = out + r * ldout;
    int64_t c = 0;
    for (; c + 8 <= channels; c += 8) {
      v8 t = splat(1.f) - splat(2.f) / (exp8(splat(2.f) * load8(content + c)) + splat(1.f));
      v8 s = splat(1.f) / (splat(1.f) + exp8(-load8(logits + c)));
      store8(o + c, t * s);
    }
    for (; c < channels; ++c)
      o[c] = (1.f - 2.f / (exp1(2.f * content[c]) + 1.f)) * (1.f / (1.f + exp1(-logits[c])));
  }
}

inline void relu_rows(float* x, int64_t ld, int64_t width, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; ++c) x[r * ld + c] = x[r * ld + c] > 0.f ? x[r * ld + c] : 0.f;
}

// The pixel value by inverse CDF of softmax(logits / temperature) at `noise`, as the exported
// graphs choose it: the count of CDF entries (all but the last) below the noise; temperature 0
// takes the first argmax.
inline int64_t choose_level(const float* logits, int64_t levels, float noise, float temperature) {
  int64_t best = 0;
  for (int64_t v = 1; v < levels; ++v)
    if (logits[v] > logits[best]) best = v;
  if (temperature == 0.f) return best;
  const float top = logits[best] / temperature;
  float probs[256];
  float total = 0.f;
  for (int64_t v = 0; v < levels; ++v) total += probs[v] = std::exp(logits[v] / temperature - top);
  int64_t chosen = 0;
  float cdf = 0.f;
  for (int64_t v = 0; v + 1 < levels; ++v) {
    cdf += probs[v] / total;
    chosen += cdf < noise;
  }
  return chosen;
}

// A step's pixel `index` (slot * span + t): the teacher's where one is given (its logits then
// recorded), else chosen from the logits.
inline int64_t pick_level(const float* logits, int64_t levels, int64_t index, const int64_t* teacher,
                          const float* noise, float temperature, float* record) {
  if (!teacher) return choose_level(logits, levels, noise[index], temperature);
  std::memcpy(record + index * levels, logits, levels * sizeof(float));
  return teacher[index];
}

// A pixel level as the network's input: levels 0..L-1 → [-1, 1], rounded as the graphs round it.
inline float level_value(int64_t level, int64_t levels) {
  return static_cast<float>(level) * static_cast<float>(2.0 / (levels - 1)) - 1.f;
}

}  // namespace genserve
