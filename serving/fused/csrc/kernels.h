// Building blocks of the fused CPU sampling steps: small dense layers, gates and the pixel choice.
//
// Sizes here are tiny (tens to hundreds of features) and rows few (one per slot, or per slot
// and column), so a BLAS call costs more in dispatch than in arithmetic. These loops are
// written for the compiler to vectorise (GCC vector extensions, compiled with -march=native):
// register tiles of R rows by V vectors of outputs, with R * V >= 8 independent accumulator
// chains so a batch-1 matrix-vector product is not bound by FMA latency. A vector is the
// machine's widest: 16 floats with AVX-512, else 8 (AVX2), so the same source runs at full
// width on either.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

namespace genserve {

// `count` floats of scratch, uninitialised, 64-byte aligned, owned by the calling thread and reused
// by its later calls (each call must be done with it before the next starts). A per-call
// std::vector of megabytes (the refresh's at batch 64) went back to the OS at every call: the page
// faults and zeroing of fresh pages took ~5% of a batch-64 sampling run.
inline float* thread_scratch(size_t count) {
  struct alignas(64) Line {
    float values[16];
  };
  thread_local std::unique_ptr<Line[]> buffer;
  thread_local size_t capacity = 0;
  if (capacity < count) {
    capacity = (count + 15) / 16 * 16;
    buffer.reset(new Line[capacity / 16]);
  }
  return buffer.get()->values;
}

// The floats that consecutive arrays of the given counts take, each from a cache line's start: a
// vector load or store never straddles two lines.
template <size_t K>
inline int64_t arrays_size(const std::array<int64_t, K>& counts) {
  int64_t total = 0;
  for (int64_t count : counts) total += (count + 15) / 16 * 16;
  return total;
}

// Those arrays, from `base` (64-byte aligned, arrays_size(counts) floats) on.
template <size_t K>
inline std::array<float*, K> carve_arrays(const std::array<int64_t, K>& counts, float* base) {
  std::array<float*, K> arrays;
  for (size_t i = 0; i < K; ++i) {
    arrays[i] = base;
    base += (counts[i] + 15) / 16 * 16;
  }
  return arrays;
}

// Those arrays in one thread_scratch.
template <size_t K>
inline std::array<float*, K> scratch_arrays(const std::array<int64_t, K>& counts) {
  return carve_arrays(counts, thread_scratch(arrays_size(counts)));
}

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;  // of 32 vector registers: the rest hold weights and inputs
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 12;  // of 16
#endif

// N floats in one vector register (and N int32 of the same width, for bit manipulation).
template <int N>
struct Vec {
  typedef float f __attribute__((vector_size(4 * N)));
  typedef int32_t i __attribute__((vector_size(4 * N)));
};

template <int N>
inline typename Vec<N>::f loadv(const float* p) {
  typename Vec<N>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int N>
inline void storev(float* p, typename Vec<N>::f v) {
  std::memcpy(p, &v, sizeof v);
}

template <int N>
inline typename Vec<N>::f splat(float x) {  // lane 0 into every lane
  return __builtin_shuffle(typename Vec<N>::f{x}, typename Vec<N>::i{});
}

// y[r, o0 : o0 + V vectors of N] = (accumulate ? y : 0) + bias + sum_i x[r, i] * w[i, o] for R rows.
// The sum over i is split S ways (partial sums added at the end), so that R * V * S >= 8 chains run at once.
template <int R, int V, int S, int N>
inline void dense_tile(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, int64_t o0,
                       const float* bias, float* y, int64_t ldy, bool accumulate) {
  typedef typename Vec<N>::f vf;
  vf acc[S][R][V];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[s][r][v] = splat<N>(0.f);
  int64_t i = 0;
  for (; i + S <= in; i += S)
    for (int s = 0; s < S; ++s) {
      const float* wi = w + (i + s) * out + o0;
      vf wv[V];
      for (int v = 0; v < V; ++v) wv[v] = loadv<N>(wi + N * v);
      for (int r = 0; r < R; ++r) {
        vf xr = splat<N>(x[r * ldx + i + s]);
        for (int v = 0; v < V; ++v) acc[s][r][v] += xr * wv[v];
      }
    }
  for (; i < in; ++i) {
    const float* wi = w + i * out + o0;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[0][r][v] += splat<N>(x[r * ldx + i]) * loadv<N>(wi + N * v);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      vf total = accumulate ? loadv<N>(y + r * ldy + o0 + N * v) : splat<N>(0.f);
      if (bias) total += loadv<N>(bias + o0 + N * v);
      for (int s = 0; s < S; ++s) total += acc[s][r][v];
      storev<N>(y + r * ldy + o0 + N * v, total);
    }
}

// Outputs past the last whole vector (e.g. two pixel levels): four partial sums per output.
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

// Ways to split a tile's sums so that it runs at least 8 chains.
constexpr int split_for(int R, int V) { return R * V >= 8 ? 1 : 8 / (R * V); }

// The widest power of two of vectors per tile (at most 8) whose R * V accumulators fit the registers.
constexpr int widest_for(int R) {
  int v = 8;
  while (v > 1 && R * v > kAccumulators) v /= 2;
  return v;
}

// R rows from output o0 on, in vectors of N: tiles of V vectors while they fit, then narrower
// ones, then (with 16-lane vectors) 8 outputs at half width, then the tail: small layers stay vectorised.
template <int R, int N, int V = widest_for(R)>
inline void dense_rows(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, const float* bias,
                       float* y, int64_t ldy, bool accumulate, int64_t o0 = 0) {
  for (; o0 + N * V <= out; o0 += N * V)
    dense_tile<R, V, split_for(R, V), N>(x, ldx, w, in, out, o0, bias, y, ldy, accumulate);
  if constexpr (V > 1) {
    dense_rows<R, N, V / 2>(x, ldx, w, in, out, bias, y, ldy, accumulate, o0);
  } else {
    if constexpr (N > 8) {
      if (o0 + 8 <= out) {
        dense_tile<R, 1, split_for(R, 1), 8>(x, ldx, w, in, out, o0, bias, y, ldy, accumulate);
        o0 += 8;
      }
    }
    if (o0 < out) dense_tail(x, ldx, w, in, out, o0, bias, y, ldy, R, accumulate);
  }
}

// The most rows a tile of dense() takes; its tiles of that many start at multiples of it.
constexpr int64_t kTileRows = 6;

template <int N>
inline void dense_in(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, const float* bias, float* y,
                     int64_t ldy, int64_t rows, bool accumulate) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    dense_rows<kTileRows, N>(x + r * ldx, ldx, w, in, out, bias, y + r * ldy, ldy, accumulate);
  for (; r + 4 <= rows; r += 4) dense_rows<4, N>(x + r * ldx, ldx, w, in, out, bias, y + r * ldy, ldy, accumulate);
  for (; r + 2 <= rows; r += 2) dense_rows<2, N>(x + r * ldx, ldx, w, in, out, bias, y + r * ldy, ldy, accumulate);
  if (r < rows) dense_rows<1, N>(x + r * ldx, ldx, w, in, out, bias, y + r * ldy, ldy, accumulate);
}

// A dense layer over `rows` rows: y = (accumulate ? y : 0) + bias + x w, with w stored (in, out).
// bias may be null. x rows are ldx apart, y rows ldy apart. A few rows (a batch-1 step's
// matrix-vector products) go 8 lanes at a time even with AVX-512: they wait on the weights'
// loads and the chain's latency, and measured faster at the narrower width.
inline void dense(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, const float* bias, float* y,
                  int64_t ldy, int64_t rows, bool accumulate = false) {
  if (rows < 4) dense_in<8>(x, ldx, w, in, out, bias, y, ldy, rows, accumulate);
  else dense_in<kLanes>(x, ldx, w, in, out, bias, y, ldy, rows, accumulate);
}

// Rows first..last of dense() over `rows` rows, with the bits the whole call gives them: `first` a
// multiple of kTileRows and `last` one too or `rows`, so the part is made of the whole call's tiles;
// under 4 rows the whole call is one part.
inline void dense_part(const float* x, int64_t ldx, const float* w, int64_t in, int64_t out, const float* bias,
                       float* y, int64_t ldy, int64_t rows, int64_t first, int64_t last, bool accumulate = false) {
  if (rows < 4) dense_in<8>(x, ldx, w, in, out, bias, y, ldy, rows, accumulate);
  else dense_in<kLanes>(x + first * ldx, ldx, w, in, out, bias, y + first * ldy, ldy, last - first, accumulate);
}

// exp on every lane (Cephes' expf polynomial, ~1 ulp), inputs clamped to the finite range.
template <int N>
inline typename Vec<N>::f expv(typename Vec<N>::f x) {
  typedef typename Vec<N>::f vf;
  typedef typename Vec<N>::i vi;
  const vf hi = splat<N>(88.3762626647949f), lo = splat<N>(-87.3365447504f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf magic = splat<N>(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * splat<N>(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = x - n * splat<N>(0.693359375f);
  r = r - n * splat<N>(-2.12194440e-4f);
  vf p = splat<N>(1.9875691500E-4f);
  p = p * r + splat<N>(1.3981999507E-3f);
  p = p * r + splat<N>(8.3334519073E-3f);
  p = p * r + splat<N>(4.1665795894E-2f);
  p = p * r + splat<N>(1.6666665459E-1f);
  p = p * r + splat<N>(5.0000001201E-1f);
  vf y = p * r * r + r + splat<N>(1.f);
  vi tn, mn;
  std::memcpy(&tn, &t, sizeof t);
  std::memcpy(&mn, &magic, sizeof magic);
  vi bits = ((tn - mn) + 127) << 23;  // 2^n
  vf scale;
  std::memcpy(&scale, &bits, sizeof bits);
  return y * scale;
}

// exp(x) - 1 on every lane, to ~1 ulp of the result near 0 too (where exp(x) - 1 would lose the digits):
// the Taylor series to x**8 / 8! below |x| = 0.35 (the first term left out is under 2e-9 of x there).
template <int N>
inline typename Vec<N>::f expm1v(typename Vec<N>::f x) {
  typedef typename Vec<N>::f vf;
  vf series = splat<N>(1.f / 40320.f);
  for (float c : {1.f / 5040.f, 1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f}) series = series * x + splat<N>(c);
  series = series * x;
  const vf magnitude = x < splat<N>(0.f) ? -x : x;
  return magnitude < splat<N>(0.35f) ? series : expv<N>(x) - splat<N>(1.f);
}

// Natural log on every lane of positive, finite inputs (Cephes' logf polynomial, ~1 ulp).
template <int N>
inline typename Vec<N>::f logv(typename Vec<N>::f x) {
  typedef typename Vec<N>::f vf;
  typedef typename Vec<N>::i vi;
  vi bits;
  std::memcpy(&bits, &x, sizeof bits);
  vi exponent = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // the mantissa, in [0.5, 1)
  vf m;
  std::memcpy(&m, &bits, sizeof bits);
  const auto small = m < splat<N>(0.707106781186547524f);
  exponent -= small ? vi{} + 1 : vi{};
  m = (small ? m + m : m) - splat<N>(1.f);
  vf e = __builtin_convertvector(exponent, vf);
  const vf z = m * m;
  vf y = splat<N>(7.0376836292E-2f);
  for (float c : {-1.1514610310E-1f, 1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f, -1.6668057665E-1f,
                  2.0000714765E-1f, -2.4999993993E-1f, 3.3333331174E-1f})
    y = y * m + splat<N>(c);
  y = y * m * z + e * splat<N>(-2.12194440e-4f) - splat<N>(0.5f) * z;
  return m + y + e * splat<N>(0.693359375f);
}

inline float exp1(float x) {
  float lanes[8] = {x};
  return expv<8>(loadv<8>(lanes))[0];
}

// The gate on N channels: tanh(a) * sigmoid(b) from a = content[0:N], b = logits[0:N].
template <int N>
inline void gate_vector(const float* content, const float* logits, float* out) {
  typedef typename Vec<N>::f vf;
  const vf one = splat<N>(1.f), two = splat<N>(2.f);
  vf t = one - two / (expv<N>(two * loadv<N>(content)) + one);
  vf s = one / (one + expv<N>(-loadv<N>(logits)));
  storev<N>(out, t * s);
}

// Gated activation over rows: out[r, c] = tanh(pre[r, c]) * sigmoid(pre[r, C + c]), c < C.
// tanh(a) = 1 - 2 / (exp(2a) + 1) and sigmoid(b) = 1 / (1 + exp(-b)): absolute error ~1e-7.
inline void gate_rows(const float* pre, int64_t ldpre, float* out, int64_t ldout, int64_t channels, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* content = pre + r * ldpre;
    const float* logits = content + channels;
    float* o = out + r * ldout;
    int64_t c = 0;
    for (; c + kLanes <= channels; c += kLanes) gate_vector<kLanes>(content + c, logits + c, o + c);
    for (; c + 8 <= channels; c += 8) gate_vector<8>(content + c, logits + c, o + c);
    for (; c < channels; ++c)
      o[c] = (1.f - 2.f / (exp1(2.f * content[c]) + 1.f)) * (1.f / (1.f + exp1(-logits[c])));
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols: 8x8 tiles through registers (three rounds
// of two-vector shuffles), the edges element by element. Element by element throughout, a row cache's
// (channel, column) transposes took ~14% of a batch-64 PixelCNN step's perf samples.
inline void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  typedef Vec<8>::f vf;
  typedef Vec<8>::i vi;
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      vf r[8], a[8], b[8];
      for (int k = 0; k < 8; ++k) r[k] = loadv<8>(src + (i + k) * ld_src + j);
      for (int k = 0; k < 8; k += 2) {  // rows k, k+1 interleaved: (k0 k+1,0 k1 k+1,1 | k4 ...), (k2 ...)
        a[k] = __builtin_shuffle(r[k], r[k + 1], vi{0, 8, 1, 9, 4, 12, 5, 13});
        a[k + 1] = __builtin_shuffle(r[k], r[k + 1], vi{2, 10, 3, 11, 6, 14, 7, 15});
      }
      for (int k = 0; k < 8; k += 4) {  // b[k + c]: column c of rows k..k+3, then column c + 4 of them
        b[k] = __builtin_shuffle(a[k], a[k + 2], vi{0, 1, 8, 9, 4, 5, 12, 13});
        b[k + 1] = __builtin_shuffle(a[k], a[k + 2], vi{2, 3, 10, 11, 6, 7, 14, 15});
        b[k + 2] = __builtin_shuffle(a[k + 1], a[k + 3], vi{0, 1, 8, 9, 4, 5, 12, 13});
        b[k + 3] = __builtin_shuffle(a[k + 1], a[k + 3], vi{2, 3, 10, 11, 6, 7, 14, 15});
      }
      for (int c = 0; c < 4; ++c) {
        storev<8>(dst + (j + c) * ld_dst + i, __builtin_shuffle(b[c], b[c + 4], vi{0, 1, 2, 3, 8, 9, 10, 11}));
        storev<8>(dst + (j + c + 4) * ld_dst + i, __builtin_shuffle(b[c], b[c + 4], vi{4, 5, 6, 7, 12, 13, 14, 15}));
      }
    }
    for (; j < cols; ++j)
      for (int k = 0; k < 8; ++k) dst[j * ld_dst + i + k] = src[(i + k) * ld_src + j];
  }
  for (; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

inline void relu_rows(float* x, int64_t ld, int64_t width, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; ++c) x[r * ld + c] = x[r * ld + c] > 0.f ? x[r * ld + c] : 0.f;
}

// The pixel value by inverse CDF of softmax(logits / temperature) at `noise`, as the exported
// graphs choose it: the count of CDF entries (all but the last) below the noise; temperature 0
// takes the first argmax. Each entry adds a probability (>= 0) to the one before, so the entries
// never decrease and the count ends at the first entry not below the noise.
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
  for (; chosen + 1 < levels; ++chosen) {
    cdf += probs[chosen] / total;
    if (!(cdf < noise)) break;
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
