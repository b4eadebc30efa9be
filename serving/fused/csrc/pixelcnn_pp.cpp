// Fused cached sampling for PixelCNN++ (Salimans et al. 2017) on the CPU, a whole row per call.
//
// The same program as the exported graphs (export/steps.py, PixelCNNPPRefresh and PixelCNNPPStep),
// on the same states. The refresh runs the u stream (rows above only) over the row at every
// resolution that is live on it. The step differs from the graph in how much it computes: the graph
// recomputes the ul stream's whole row strip through every resolution for each pixel (O(W) per pixel);
// every convolution of the ul stream sees only its input's columns up to its own, so here each pixel
// computes its own column at full resolution, and column j >> s at resolution s when j is a multiple of
// 2**s, keeping each convolution's input of the row so far (the records the graph packs into ul_rows).
// That needs the row's earlier pixels within the call, so a step call samples whole rows.
//
// Slots whose rows have the same resolutions live (row % 2**s == 0 for s below that count) go in blocks
// of up to 8 and run every dense layer together. Weights arrive packed by `genserve export`
// (export/fused.py): convolution kernels as (window, out) with windows flattened as rows, columns,
// channels; blocks in the order the network runs them (the up pass's from the finest resolution, then
// the down pass's from the coarsest).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels.h"
#include "rows.h"

namespace genserve {
namespace {

using at::Tensor;

constexpr int64_t kSlotBlock = 8;
constexpr int kWeightCount = 31;
// In the order export/fused.py packs them (serving/fused/weights.py: PIXELCNN_PP_WEIGHTS).
constexpr const char* kWeightNames[kWeightCount] = {
    "u_init_w", "u_init_b", "ul_above_w", "ul_above_b", "ul_left_w", "ul_left_b", "u_in_w", "u_in_b",
    "u_out_w", "u_out_b", "u_short_w", "u_short_b", "ul_in_w", "ul_in_b", "ul_out_w", "ul_out_b",
    "ul_up_short_w", "ul_up_short_b", "ul_down_short_w", "ul_down_short_b", "u_down_w", "u_down_b", "ul_down_w",
    "ul_down_b", "u_up_w", "u_up_b", "ul_up_w", "ul_up_b", "out_w", "out_b", "constants"};
constexpr int64_t kMaxMixtures = 32;

struct PPWeights {
  const float *u_init_w, *u_init_b, *ul_above_w, *ul_above_b, *ul_left_w, *ul_left_b;
  const float *u_in_w, *u_in_b, *u_out_w, *u_out_b, *u_short_w, *u_short_b;
  const float *ul_in_w, *ul_in_b, *ul_out_w, *ul_out_b, *ul_up_short_w, *ul_up_short_b, *ul_down_short_w,
      *ul_down_short_b;
  const float *u_down_w, *u_down_b, *ul_down_w, *ul_down_b, *u_up_w, *u_up_b, *ul_up_w, *ul_up_b, *out_w, *out_b;
  int64_t f, scales, per_scale, up_blocks, mixtures, levels;

  explicit PPWeights(at::TensorList w) {
    TORCH_CHECK(w.size() == kWeightCount, "pixelcnn_pp weights: expected ", kWeightCount, " tensors, got ", w.size());
    for (const Tensor& t : w)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                  "pixelcnn_pp weights must be contiguous float32 CPU tensors");
    const float** fields[] = {&u_init_w,        &u_init_b,      &ul_above_w,    &ul_above_b,    &ul_left_w,
                              &ul_left_b,       &u_in_w,        &u_in_b,        &u_out_w,       &u_out_b,
                              &u_short_w,       &u_short_b,     &ul_in_w,       &ul_in_b,       &ul_out_w,
                              &ul_out_b,        &ul_up_short_w, &ul_up_short_b, &ul_down_short_w, &ul_down_short_b,
                              &u_down_w,        &u_down_b,      &ul_down_w,     &ul_down_b,     &u_up_w,
                              &u_up_b,          &ul_up_w,       &ul_up_b,       &out_w,         &out_b};
    for (int i = 0; i + 1 < kWeightCount; ++i) *fields[i] = w[i].data_ptr<float>();
    f = w[1].size(0);
    scales = w[25].size(0) + 1;
    up_blocks = w[16].size(0);
    per_scale = up_blocks / scales;
    mixtures = w[29].size(0) / 3;
    const int64_t down = up_blocks + scales - 1, blocks = up_blocks + down, S1 = scales - 1, M3 = 3 * mixtures;
    TORCH_CHECK(per_scale >= 1 && up_blocks == per_scale * scales, "pixelcnn_pp weights: ", up_blocks,
                " up-pass blocks for ", scales, " resolutions");
    const std::vector<std::vector<int64_t>> shapes = {
        {12, f}, {f}, {6, f}, {f}, {4, f}, {f},                                                   // the first layer
        {blocks, 12 * f, f}, {blocks, f}, {blocks, 12 * f, 2 * f}, {blocks, 2 * f}, {down, 2 * f, f}, {down, f},
        {blocks, 8 * f, f}, {blocks, f}, {blocks, 8 * f, 2 * f}, {blocks, 2 * f}, {up_blocks, 2 * f, f},
        {up_blocks, f}, {down, 4 * f, f}, {down, f},
        {S1, 6 * f, f}, {S1, f}, {S1, 4 * f, f}, {S1, f}, {S1, 2, 3 * f, f}, {S1, f}, {S1, 2, 2 * f, f}, {S1, f},
        {f, M3}, {M3}, {1}};
    for (int i = 0; i < kWeightCount; ++i)
      TORCH_CHECK(w[i].sizes() == at::IntArrayRef(shapes[i]), "pixelcnn_pp weights: ", kWeightNames[i], " has shape ",
                  w[i].sizes(), ", expected ", at::IntArrayRef(shapes[i]), " for ", f, " filters, ", scales,
                  " resolutions, ", per_scale, " blocks per resolution and ", mixtures, " mixtures");
    levels = static_cast<int64_t>(w[30].data_ptr<float>()[0]);
    TORCH_CHECK(levels >= 2 && levels <= 256, "pixelcnn_pp weights: 2..256 levels, got ", levels);
    TORCH_CHECK(mixtures >= 1 && mixtures <= kMaxMixtures, "pixelcnn_pp weights: 1..", kMaxMixtures,
                " mixtures, got ", mixtures);
  }

  int64_t down_count(int64_t s) const { return per_scale + (s < scales - 1); }
  int64_t down_index(int64_t s, int64_t k) const {  // among the down pass's blocks, the coarsest resolution's first
    int64_t index = k;
    for (int64_t t = scales - 1; t > s; --t) index += down_count(t);
    return index;
  }
  // The up-pass value a down block's shortcut takes: the network pops them last first, and the coarsest
  // resolution starts its down pass from the last.
  int64_t popped(int64_t s, int64_t k) const { return s == scales - 1 ? per_scale - 1 - k : per_scale - k; }
};

// Where each recorded row and each u-stream value lies in a resolution's state, in the order the network
// records them (models/pixelcnn_pp.RowContext): the u and ul streams record alike.
struct Layout {
  std::vector<int64_t> up_in, up_out, down_in, down_out;  // per block: its two convolutions' inputs (2F each)
  int64_t downsample_in = -1, carry = -1, rows = 0;        // F each; channels in all
  std::vector<int64_t> up_value, down_value;               // the u stream's block outputs (F each)
  int64_t downsampled = -1, upsampled = -1, carried = -1, values = 0;

  Layout(const PPWeights& w, int64_t s) {
    const int64_t f = w.f, last = w.scales - 1;
    for (int64_t k = 0; k < w.per_scale; ++k) {
      up_in.push_back(rows);
      up_out.push_back(rows + 2 * f);
      rows += 4 * f;
    }
    if (s < last) downsample_in = rows, rows += f;
    for (int64_t k = 0; k < w.down_count(s); ++k) {
      down_in.push_back(rows);
      down_out.push_back(rows + 2 * f);
      rows += 4 * f;
    }
    if (s > 0) carry = rows, rows += f;
    if (s > 0) downsampled = values, values += f;
    for (int64_t k = 0; k < w.per_scale; ++k) up_value.push_back(values), values += f;
    if (s < last) upsampled = values, values += f;
    for (int64_t k = 0; k < w.down_count(s); ++k) down_value.push_back(values), values += f;
    if (s > 0) carried = values, values += f;
  }
};

// The states of one call, per resolution: u_rows, ul_rows, u_values (n, channels, width), channel-major.
struct Call {
  const uint8_t* pixels;
  const int64_t* positions;
  const float *noise, *temperature;
  const int64_t* teacher;  // or null
  float* logits;           // recorded where a teacher is given
  int64_t* pixel;          // (n, W): the row's chosen levels
  std::vector<float*> u_rows, ul_rows, u_values;  // empty where the phase does not touch them
  std::vector<Layout> layouts;
  int64_t n, height, width;

  int64_t row(int64_t slot) const { return positions[slot] / width; }
  int64_t live(int64_t slot) const {  // how many resolutions this slot's row computes
    int64_t count = 1;
    while (count < static_cast<int64_t>(layouts.size()) && row(slot) % (int64_t{1} << count) == 0) ++count;
    return count;
  }
};

// The network's input at (row, column) of a slot's image: the scaled level and a channel of ones, zeros
// outside the image (the full pass's padding).
inline void input_at(const Call& call, int64_t slot, int64_t row, int64_t column, int64_t levels, float* out) {
  if (row < 0 || column < 0 || column >= call.width) {
    out[0] = out[1] = 0.f;
    return;
  }
  out[0] = level_value(call.pixels[(slot * call.height + row) * call.width + column], levels);
  out[1] = 1.f;
}

inline float elu(float x) { return x > 0.f ? x : std::expm1(x); }

template <int N>
inline typename Vec<N>::f eluv(typename Vec<N>::f x) {
  return x > splat<N>(0.f) ? x : expm1v<N>(x);
}

// concat_elu over rows: out[r] = [elu(x[r]), elu(-x[r])], C channels each.
void concat_elu(const float* x, int64_t ldx, int64_t C, int64_t rows, float* out, int64_t ldo) {
  constexpr int N = 8;
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * ldx;
    float* o = out + r * ldo;
    int64_t c = 0;
    for (; c + N <= C; c += N) {
      const typename Vec<N>::f v = loadv<N>(in + c);
      storev<N>(o + c, eluv<N>(v));
      storev<N>(o + C + c, eluv<N>(-v));
    }
    for (; c < C; ++c) {
      o[c] = elu(in[c]);
      o[C + c] = elu(-in[c]);
    }
  }
}

// x[r] += h[r, 0:C] * sigmoid(h[r, C:2C]): a gated resnet's output.
void gate_add(const float* h, int64_t C, int64_t rows, float* x, int64_t ldx) {
  constexpr int N = 8;
  typedef typename Vec<N>::f vf;
  for (int64_t r = 0; r < rows; ++r) {
    const float *content = h + r * 2 * C, *gate = content + C;
    float* out = x + r * ldx;
    int64_t c = 0;
    for (; c + N <= C; c += N)
      storev<N>(out + c, loadv<N>(out + c) + loadv<N>(content + c) * (splat<N>(1.f) / (splat<N>(1.f) +
                                                                                      expv<N>(-loadv<N>(gate + c)))));
    for (; c < C; ++c) out[c] += content[c] * (1.f / (1.f + std::exp(-gate[c])));
  }
}

// Rows (slot q, output column c in [c0, c1)) of the (2, taps) window over a recorded input of C channels:
// the row above's columns stride * c - 1 .. stride * c + taps - 2, then the current row's, zeros off the row.
// `above` and `current` point at the record's first channel; a column of either is `ld` floats, a slot's row
// `in_width` columns.
void window(const float* above, const float* current, int64_t ld, int64_t C, int64_t m, int64_t in_width,
            int64_t taps, int64_t stride, int64_t c0, int64_t c1, float* out) {
  const int64_t K = 2 * taps * C;
  for (int64_t q = 0; q < m; ++q)
    for (int64_t c = c0; c < c1; ++c) {
      float* o = out + (q * (c1 - c0) + c - c0) * K;
      for (int64_t r = 0; r < 2; ++r)
        for (int64_t k = 0; k < taps; ++k) {
          const int64_t column = stride * c - 1 + k;
          float* dst = o + (r * taps + k) * C;
          if (column < 0 || column >= in_width) {
            std::fill_n(dst, C, 0.f);
          } else {
            std::copy_n((r ? current : above) + (q * in_width + column) * ld, C, dst);
          }
        }
    }
}

// A slot block's state of one resolution, channel-major (n, channels, w), to or from channels-last (m, w, ld).
void to_columns(const float* state, const int64_t* slots, int64_t m, int64_t channels, int64_t w, int64_t first,
                int64_t count, float* out, int64_t ld) {
  for (int64_t q = 0; q < m; ++q) {
    const float* s = state + slots[q] * channels * w;
    for (int64_t c = 0; c < count; ++c)
      for (int64_t j = 0; j < w; ++j) out[(q * w + j) * ld + c] = s[(first + c) * w + j];
  }
}

void from_columns(const float* columns, int64_t ld, const int64_t* slots, int64_t m, int64_t channels, int64_t w,
                  float* state) {
  for (int64_t q = 0; q < m; ++q) {
    float* s = state + slots[q] * channels * w;
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t j = 0; j < w; ++j) s[c * w + j] = columns[(q * w + j) * ld + c];
  }
}

// Carves per-thread scratch (kernels.h) into arrays of the given float counts.
std::vector<float*> scratch(const std::vector<int64_t>& counts) {
  size_t total = 0;
  for (int64_t count : counts) total += (count + 15) / 16 * 16;
  float* next = thread_scratch(total);
  std::vector<float*> arrays;
  for (int64_t count : counts) {
    arrays.push_back(next);
    next += (count + 15) / 16 * 16;
  }
  return arrays;
}

// One gated resnet block of either stream on `rows` positions: x (rows, F) in place. Its two convolutions'
// inputs, concat_elu(x) and concat_elu(h), are first recorded (record(offset, values, ld) writes them where
// the window reads them), then windowed (make_window(offset, out) → the (rows, K) window).
// shortcut: (rows, Ks) already through concat_elu, or null.
template <class Record, class MakeWindow>
void gated_block(const PPWeights& w, int64_t rows, int64_t K, const float* in_w, const float* in_b,
                 const float* out_w, const float* out_b, const float* shortcut, int64_t Ks, const float* short_w,
                 const float* short_b, int64_t in_offset, int64_t out_offset, float* x, float* elus, float* windows,
                 float* h, float* h2, Record record, MakeWindow make_window) {
  const int64_t f = w.f;
  concat_elu(x, f, f, rows, elus, 2 * f);
  record(in_offset, elus);
  make_window(in_offset, windows);
  dense(windows, K, in_w, K, f, in_b, h, f, rows);
  if (shortcut) dense(shortcut, Ks, short_w, Ks, f, short_b, h, f, rows, true);
  concat_elu(h, f, f, rows, elus, 2 * f);
  record(out_offset, elus);
  make_window(out_offset, windows);
  dense(windows, K, out_w, K, 2 * f, out_b, h2, 2 * f, rows);
  gate_add(h2, f, rows, x, f);
}

// ---- the refresh: the u stream of a row, every live resolution's whole row at once ----------------------------
void refresh_block(const PPWeights& w, const Call& call, const int64_t* slots, int64_t m, int64_t live) {
  const int64_t f = w.f, S = w.scales, r = w.per_scale, W = call.width;
  std::vector<int64_t> counts;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t cells = m * (W >> s);
    const Layout& layout = call.layouts[s];
    counts.insert(counts.end(), {cells * layout.rows, cells * layout.rows, cells * layout.values,
                                 cells * f * (r + 1)});
  }
  const int64_t cells = m * W;
  counts.insert(counts.end(), {cells * 12 * f, cells * 2 * f, cells * f, cells * 2 * f, cells * 2 * f, cells * f});
  const std::vector<float*> arrays = scratch(counts);
  auto above = [&](int64_t s) { return arrays[4 * s]; };    // the state's rows, channels-last
  auto current = [&](int64_t s) { return arrays[4 * s + 1]; };
  auto values = [&](int64_t s) { return arrays[4 * s + 2]; };
  auto ups = [&](int64_t s, int64_t k) { return arrays[4 * s + 3] + k * m * (W >> s) * f; };  // input, block outputs
  float *windows = arrays[4 * S], *elus = arrays[4 * S + 1], *h = arrays[4 * S + 2], *h2 = arrays[4 * S + 3],
        *shortcut = arrays[4 * S + 4], *x = arrays[4 * S + 5];

  for (int64_t s = 0; s < live; ++s)
    to_columns(call.u_rows[s], slots, m, call.layouts[s].rows, W >> s, 0, call.layouts[s].rows, above(s),
               call.layouts[s].rows);

  // The first layer: the down-shifted convolution over image rows i-2 and i-1 (exactly zero on row 0).
  for (int64_t q = 0; q < m; ++q) {
    const int64_t row = call.row(slots[q]);
    for (int64_t j = 0; j < W; ++j)
      for (int64_t a = 0; a < 2; ++a)
        for (int64_t k = 0; k < 3; ++k)
          input_at(call, slots[q], row - 2 + a, j - 1 + k, w.levels, windows + (q * W + j) * 12 + (a * 3 + k) * 2);
  }
  dense(windows, 12, w.u_init_w, 12, f, w.u_init_b, ups(0, 0), f, cells);
  for (int64_t q = 0; q < m; ++q)
    if (call.row(slots[q]) == 0) std::fill_n(ups(0, 0) + q * W * f, W * f, 0.f);

  auto block = [&](int64_t s, int64_t index, int64_t in_offset, int64_t out_offset, float* value,
                   const float* short_input, int64_t short_index) {
    const int64_t width = W >> s, rows = m * width, ld = call.layouts[s].rows;
    auto record = [&](int64_t offset, const float* elu_values) {
      for (int64_t p = 0; p < rows; ++p) std::copy_n(elu_values + p * 2 * f, 2 * f, current(s) + p * ld + offset);
    };
    auto make_window = [&](int64_t offset, float* out) {
      window(above(s) + offset, current(s) + offset, ld, 2 * f, m, width, 3, 1, 0, width, out);
    };
    if (short_input) concat_elu(short_input, f, f, rows, shortcut, 2 * f);
    gated_block(w, rows, 12 * f, w.u_in_w + index * 12 * f * f, w.u_in_b + index * f,
                w.u_out_w + index * 12 * f * 2 * f, w.u_out_b + index * 2 * f, short_input ? shortcut : nullptr,
                2 * f, w.u_short_w + short_index * 2 * f * f, w.u_short_b + short_index * f, in_offset, out_offset,
                value, elus, windows, h, h2, record, make_window);
  };
  auto keep_value = [&](int64_t s, int64_t offset, const float* value) {
    const int64_t rows = m * (W >> s), ld = call.layouts[s].values;
    for (int64_t p = 0; p < rows; ++p) std::copy_n(value + p * f, f, values(s) + p * ld + offset);
  };

  for (int64_t s = 0; s < live; ++s) {  // the up pass
    const Layout& layout = call.layouts[s];
    const int64_t width = W >> s, rows = m * width;
    for (int64_t k = 0; k < r; ++k) {
      std::copy_n(ups(s, k), rows * f, ups(s, k + 1));
      block(s, s * r + k, layout.up_in[k], layout.up_out[k], ups(s, k + 1), nullptr, 0);
      keep_value(s, layout.up_value[k], ups(s, k + 1));
    }
    if (s + 1 == S) break;
    for (int64_t p = 0; p < rows; ++p)
      std::copy_n(ups(s, r) + p * f, f, current(s) + p * layout.rows + layout.downsample_in);
    if (s + 1 < live) {
      window(above(s) + layout.downsample_in, current(s) + layout.downsample_in, layout.rows, f, m, width, 3, 2, 0,
             width / 2, windows);
      dense(windows, 6 * f, w.u_down_w + s * 6 * f * f, 6 * f, f, w.u_down_b + s * f, ups(s + 1, 0), f, rows / 2);
      keep_value(s + 1, call.layouts[s + 1].downsampled, ups(s + 1, 0));
    }
  }
  for (int64_t s = std::min(live, S) - 1; s >= 0; --s) {  // the down pass, from the coarsest live resolution
    const Layout& layout = call.layouts[s];
    const int64_t width = W >> s, rows = m * width;
    if (s == S - 1) {
      std::copy_n(ups(s, r), rows * f, x);
    } else {  // the resolution above's finished row, upsampled: computed now where live, else carried
      const float* coarse = h2;
      int64_t parity = 0;
      if (s + 1 < live) {
        coarse = ups(s + 1, 0);  // holds its finished row: see below
      } else {
        const Layout& above_layout = call.layouts[s + 1];
        to_columns(call.u_rows[s + 1], slots, m, above_layout.rows, width / 2, above_layout.carry, f, h2, f);
        parity = 1;
      }
      // Output column j of the (2, 3) stride-2 transposed convolution, cropped by a column: the full output's
      // column j + 1, from input columns (j + 1 - kw) / 2 where that is whole and on the row.
      for (int64_t q = 0; q < m; ++q)
        for (int64_t j = 0; j < width; ++j)
          for (int64_t kw = 0; kw < 3; ++kw) {
            const int64_t t = j + 1 - kw, column = t / 2;
            float* dst = windows + (q * width + j) * 3 * f + kw * f;
            if (t < 0 || t % 2 || column >= width / 2) std::fill_n(dst, f, 0.f);
            else std::copy_n(coarse + (q * (width / 2) + column) * f, f, dst);
          }
      dense(windows, 3 * f, w.u_up_w + (s * 2 + parity) * 3 * f * f, 3 * f, f, w.u_up_b + s * f, x, f, rows);
      keep_value(s, layout.upsampled, x);
    }
    for (int64_t k = 0; k < w.down_count(s); ++k) {
      const int64_t d = w.down_index(s, k);
      block(s, w.up_blocks + d, layout.down_in[k], layout.down_out[k], x, ups(s, w.popped(s, k)), d);
      keep_value(s, layout.down_value[k], x);
    }
    if (s > 0) {
      for (int64_t p = 0; p < rows; ++p) std::copy_n(x + p * f, f, current(s) + p * layout.rows + layout.carry);
      keep_value(s, layout.carried, x);
      std::copy_n(x, rows * f, ups(s, 0));  // its up-pass values are all used: the finished row, for the upsample
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    const Layout& layout = call.layouts[s];
    const int64_t width = W >> s;
    if (s < live) {
      from_columns(current(s), layout.rows, slots, m, layout.rows, width, call.u_rows[s]);
      from_columns(values(s), layout.values, slots, m, layout.values, width, call.u_values[s]);
    } else {  // not computed on this row, and not read on it: zeros, as a fresh state
      for (int64_t q = 0; q < m; ++q)
        std::fill_n(call.u_values[s] + slots[q] * layout.values * width, layout.values * width, 0.f);
    }
  }
}

// ---- the pixel choice ------------------------------------------------------------------------------------------
inline float softplus(float x) { return std::max(x, 0.f) + std::log1p(std::exp(-std::fabs(x))); }

// log(1 + exp(x)) on every lane: max(x, 0) + log1p(exp(-|x|)), log1p(t) = log(u) - ((u - 1) - t) / u for u = 1 + t
// (the correction restores the digits of t that rounding u lost).
template <int N>
inline typename Vec<N>::f softplusv(typename Vec<N>::f x) {
  typedef typename Vec<N>::f vf;
  const vf zero = splat<N>(0.f), one = splat<N>(1.f);
  const vf t = expv<N>(x < zero ? x : -x), u = one + t;
  return (x > zero ? x : zero) + logv<N>(u) - ((u - one) - t) / u;
}

// The discretized logistic mixture of one pixel: the components' log weights, means, inverse scales and
// middle-bin log-mass factors (the formulas of models/pixelcnn_pp.discretized_mixture_log_probs, in its float32 steps).
struct Mixture {
  float log_weights[kMaxMixtures], means[kMaxMixtures], inv_scales[kMaxMixtures], factors[kMaxMixtures];
  float half, two_half;
  int64_t M, L;

  Mixture(const float* params, int64_t M, int64_t L)
      : half(static_cast<float>(1.0 / (L - 1))), two_half(static_cast<float>(2.0 / (L - 1))), M(M), L(L) {
    float top = params[0];
    for (int64_t k = 1; k < M; ++k) top = std::max(top, params[k]);
    float total = 0.f;
    for (int64_t k = 0; k < M; ++k) total += std::exp(params[k] - top);
    const float log_total = std::log(total), log_two_half = static_cast<float>(std::log(2.0 / (L - 1)));
    for (int64_t k = 0; k < M; ++k) {
      log_weights[k] = params[k] - top - log_total;
      means[k] = params[M + k];
      const float log_scale = std::max(params[2 * M + k], -7.f);
      inv_scales[k] = std::exp(-log_scale);
      const float width = two_half * inv_scales[k];
      // log(1 - exp(-d)) = log d + log((1 - exp(-d)) / d), the ratio's Taylor series below d = 0.1.
      double factorial = 40320.0;
      float terms = static_cast<float>(-1.0 / factorial);
      for (int j = 7; j >= 2; --j) {
        factorial /= (j + 1);
        terms = static_cast<float>((j % 2 ? 1.0 : -1.0) / factorial) + width * terms;
      }
      factors[k] = width < 0.1f ? log_two_half - log_scale + std::log1p(width * terms)
                                : std::log(1.f - std::exp(-std::max(width, 0.1f)));
    }
  }

  // An edge level's log-probability: its bin takes the tail (level 0: log sigmoid(a); the last: log(1 - sigmoid(b))).
  float edge(int64_t level) const {
    const float centre = level_value(level, L);
    float terms[kMaxMixtures], best = -INFINITY;
    for (int64_t k = 0; k < M; ++k) {
      const float mass = level == 0 ? -softplus(-(centre + half - means[k]) * inv_scales[k])
                                    : -softplus((centre - half - means[k]) * inv_scales[k]);
      terms[k] = log_weights[k] + mass;
      best = std::max(best, terms[k]);
    }
    float sum = 0.f;
    for (int64_t k = 0; k < M; ++k) sum += std::exp(terms[k] - best);
    return best + std::log(sum);
  }

  // Every level's log-probability, the middle bins N levels at a time: a logsumexp over the components of
  // log w + a - softplus(a) - softplus(b) + log(1 - exp(-(a - b))), a and b the bin's edges scaled. A bin's
  // lower edge is the upper edge of the bin below, so each softplus of an edge is computed once and shifted a
  // lane up for the bin above (the graph computes b from the bin's own centre: equal to within an ulp).
  void log_probs(float* out) const {
    constexpr int N = kLanes;
    typedef typename Vec<N>::f vf;
    typedef typename Vec<N>::i vi;
    int32_t up_one[N];  // lane 0 from the previous vector's last lane, lane i from this one's lane i - 1
    for (int i = 0; i < N; ++i) up_one[i] = N - 1 + i;
    vi shift;
    std::memcpy(&shift, up_one, sizeof shift);
    float lanes[N];
    vf below[kMaxMixtures];  // per component, the softplus of the last vector's upper edges
    for (int64_t k = 0; k < M; ++k) below[k] = splat<N>(0.f);
    for (int64_t l0 = 0; l0 < L; l0 += N) {
      for (int i = 0; i < N; ++i) lanes[i] = static_cast<float>(l0 + i);
      const vf centre = loadv<N>(lanes) * splat<N>(two_half) - splat<N>(1.f);
      vf terms[kMaxMixtures], best = splat<N>(-INFINITY);
      for (int64_t k = 0; k < M; ++k) {
        const vf upper = (centre + splat<N>(half) - splat<N>(means[k])) * splat<N>(inv_scales[k]);
        const vf upper_softplus = softplusv<N>(upper);
        const vf lower_softplus = __builtin_shuffle(below[k], upper_softplus, shift);
        below[k] = upper_softplus;
        terms[k] = splat<N>(log_weights[k]) + (upper - upper_softplus - lower_softplus + splat<N>(factors[k]));
        best = terms[k] > best ? terms[k] : best;
      }
      vf sum = splat<N>(0.f);
      for (int64_t k = 0; k < M; ++k) sum += expv<N>(terms[k] - best);
      storev<N>(lanes, best + logv<N>(sum));
      std::copy_n(lanes, std::min<int64_t>(N, L - l0), out + l0);
    }
    out[0] = edge(0);
    out[L - 1] = edge(L - 1);
  }
};

// ---- the step: the ul stream, a column at a time ---------------------------------------------------------------
void step_block(const PPWeights& w, const Call& call, const int64_t* slots, int64_t m, int64_t live) {
  const int64_t f = w.f, S = w.scales, r = w.per_scale, W = call.width, M = w.mixtures, L = w.levels;
  std::vector<int64_t> counts;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t cells = m * (W >> s);
    const Layout& layout = call.layouts[s];
    counts.insert(counts.end(), {cells * layout.rows, cells * layout.rows, cells * layout.values, m * f * (r + 1)});
  }
  counts.insert(counts.end(), {m * W * 6, m * W * f, m * W * 2, m * 8 * f, m * 2 * f, m * f, m * 2 * f, m * 4 * f,
                               m * f, m * 3 * M, L, m * f, m * 2 * f});
  const std::vector<float*> arrays = scratch(counts);
  auto above = [&](int64_t s) { return arrays[4 * s]; };
  auto current = [&](int64_t s) { return arrays[4 * s + 1]; };
  auto values = [&](int64_t s) { return arrays[4 * s + 2]; };
  auto ups = [&](int64_t s, int64_t k) { return arrays[4 * s + 3] + k * m * f; };  // this column's up-pass values
  float *first = arrays[4 * S], *above_part = arrays[4 * S + 1], *inputs = arrays[4 * S + 2],
        *windows = arrays[4 * S + 3], *elus = arrays[4 * S + 4], *h = arrays[4 * S + 5], *h2 = arrays[4 * S + 6],
        *shortcut = arrays[4 * S + 7], *x = arrays[4 * S + 8], *params = arrays[4 * S + 9],
        *logits = arrays[4 * S + 10], *coarse = arrays[4 * S + 11], *joined = arrays[4 * S + 12];

  for (int64_t s = 0; s < live; ++s) {
    const Layout& layout = call.layouts[s];
    to_columns(call.ul_rows[s], slots, m, layout.rows, W >> s, 0, layout.rows, above(s), layout.rows);
    to_columns(call.u_values[s], slots, m, layout.values, W >> s, 0, layout.values, values(s), layout.values);
  }
  // The first layer's term from the row above (a 1x3 convolution of image row i-1; exactly zero on row 0).
  for (int64_t q = 0; q < m; ++q) {
    const int64_t row = call.row(slots[q]);
    for (int64_t j = 0; j < W; ++j)
      for (int64_t k = 0; k < 3; ++k) input_at(call, slots[q], row - 1, j - 1 + k, L, first + (q * W + j) * 6 + k * 2);
  }
  dense(first, 6, w.ul_above_w, 6, f, w.ul_above_b, above_part, f, m * W);
  for (int64_t q = 0; q < m; ++q)
    if (call.row(slots[q]) == 0) std::fill_n(above_part + q * W * f, W * f, 0.f);

  auto block = [&](int64_t s, int64_t c, int64_t index, int64_t in_offset, int64_t out_offset, float* value,
                   const float* short_w, const float* short_b, int64_t Ks) {
    const int64_t width = W >> s, ld = call.layouts[s].rows;
    auto record = [&](int64_t offset, const float* elu_values) {
      for (int64_t q = 0; q < m; ++q)
        std::copy_n(elu_values + q * 2 * f, 2 * f, current(s) + (q * width + c) * ld + offset);
    };
    auto make_window = [&](int64_t offset, float* out) {
      window(above(s) + offset, current(s) + offset, ld, 2 * f, m, width, 2, 1, c, c + 1, out);
    };
    gated_block(w, m, 8 * f, w.ul_in_w + index * 8 * f * f, w.ul_in_b + index * f, w.ul_out_w + index * 8 * f * 2 * f,
                w.ul_out_b + index * 2 * f, shortcut, Ks, short_w, short_b, in_offset, out_offset, value, elus,
                windows, h, h2, record, make_window);
  };
  auto u_value = [&](int64_t s, int64_t c, int64_t q, int64_t offset) {
    return values(s) + (q * (W >> s) + c) * call.layouts[s].values + offset;
  };
  // Column c of resolution s's up pass (and of the coarser ones that column completes), from ups(s, 0).
  auto up = [&](auto&& self, int64_t s, int64_t c) -> void {
    const Layout& layout = call.layouts[s];
    const int64_t width = W >> s;
    for (int64_t k = 0; k < r; ++k) {
      for (int64_t q = 0; q < m; ++q) concat_elu(u_value(s, c, q, layout.up_value[k]), f, f, 1, shortcut + q * 2 * f, 2 * f);
      std::copy_n(ups(s, k), m * f, ups(s, k + 1));
      block(s, c, s * r + k, layout.up_in[k], layout.up_out[k], ups(s, k + 1), w.ul_up_short_w + (s * r + k) * 2 * f * f,
            w.ul_up_short_b + (s * r + k) * f, 2 * f);
    }
    if (s + 1 == S) return;
    for (int64_t q = 0; q < m; ++q)
      std::copy_n(ups(s, r) + q * f, f, current(s) + (q * width + c) * layout.rows + layout.downsample_in);
    if (s + 1 < live && c % 2 == 0) {
      window(above(s) + layout.downsample_in, current(s) + layout.downsample_in, layout.rows, f, m, width, 2, 2, c / 2,
             c / 2 + 1, windows);
      dense(windows, 4 * f, w.ul_down_w + s * 4 * f * f, 4 * f, f, w.ul_down_b + s * f, ups(s + 1, 0), f, m);
      self(self, s + 1, c / 2);
    }
  };

  for (int64_t j = 0; j < W; ++j) {
    // The first layer: the row above's term, plus a (2, 1) convolution of column j-1 (exactly zero at column 0).
    for (int64_t q = 0; q < m; ++q) {
      float* u0 = ups(0, 0) + q * f;
      for (int64_t c = 0; c < f; ++c) u0[c] = above_part[(q * W + j) * f + c];
    }
    if (j > 0) {
      for (int64_t q = 0; q < m; ++q) {
        input_at(call, slots[q], call.row(slots[q]) - 1, j - 1, L, windows + q * 4);
        std::copy_n(inputs + (q * W + j - 1) * 2, 2, windows + q * 4 + 2);
      }
      dense(windows, 4, w.ul_left_w, 4, f, w.ul_left_b, x, f, m);
      for (int64_t p = 0; p < m * f; ++p) ups(0, 0)[p] += x[p];
    }
    up(up, 0, j);
    for (int64_t s = std::min(live, S) - 1; s >= 0; --s) {  // the down pass, at the resolutions column j completes
      if (j % (int64_t{1} << s)) continue;
      const Layout& layout = call.layouts[s];
      const int64_t c = j >> s, width = W >> s;
      if (s == S - 1) {
        std::copy_n(ups(s, r), m * f, x);
      } else {  // the resolution above's finished column c / 2, upsampled: this row's where live, else carried
        const bool carried = s + 1 >= live;
        const Layout& coarser = call.layouts[s + 1];
        for (int64_t q = 0; q < m; ++q) {
          if (carried) {
            const float* state = call.ul_rows[s + 1] + slots[q] * coarser.rows * (width / 2);
            for (int64_t ch = 0; ch < f; ++ch) coarse[q * f + ch] = state[(coarser.carry + ch) * (width / 2) + c / 2];
          } else {
            std::copy_n(current(s + 1) + (q * (width / 2) + c / 2) * coarser.rows + coarser.carry, f, coarse + q * f);
          }
        }
        const int64_t tap = (carried ? 2 : 0) + c % 2;  // (row, column) of the (2, 2) stride-2 kernel
        dense(coarse, f, w.ul_up_w + (s * 4 + tap) * f * f, f, f, w.ul_up_b + s * f, x, f, m);
      }
      for (int64_t k = 0; k < w.down_count(s); ++k) {
        const int64_t d = w.down_index(s, k);
        for (int64_t q = 0; q < m; ++q) {  // the shortcut: concat_elu of [u, ul]
          std::copy_n(u_value(s, c, q, layout.down_value[k]), f, joined + q * 2 * f);
          std::copy_n(ups(s, w.popped(s, k)) + q * f, f, joined + q * 2 * f + f);
        }
        concat_elu(joined, 2 * f, 2 * f, m, shortcut, 4 * f);
        block(s, c, w.up_blocks + d, layout.down_in[k], layout.down_out[k], x, w.ul_down_short_w + d * 4 * f * f,
              w.ul_down_short_b + d * f, 4 * f);
      }
      if (s > 0)
        for (int64_t q = 0; q < m; ++q)
          std::copy_n(x + q * f, f, current(s) + (q * width + c) * layout.rows + layout.carry);
    }
    // The output: a 1x1 of elu(ul) → the mixture → the level.
    concat_elu(x, f, f, m, joined, 2 * f);  // its first half: elu(ul)
    dense(joined, 2 * f, w.out_w, f, 3 * M, w.out_b, params, 3 * M, m);
    for (int64_t q = 0; q < m; ++q) {
      const int64_t slot = slots[q], index = slot * W + j;
      Mixture(params + q * 3 * M, M, L).log_probs(logits);
      const int64_t level = call.pixel[index] =
          pick_level(logits, L, index, call.teacher, call.noise, call.temperature[slot], call.logits);
      inputs[(q * W + j) * 2] = level_value(level, L);
      inputs[(q * W + j) * 2 + 1] = 1.f;
    }
  }
  for (int64_t s = 0; s < live; ++s)
    from_columns(current(s), call.layouts[s].rows, slots, m, call.layouts[s].rows, W >> s, call.ul_rows[s]);
}

// ---- calls -----------------------------------------------------------------------------------------------------
// Checks a call's controls and the states it touches (null lists: not this phase's), and points `call` at them.
Call make_call(const PPWeights& w, const Tensor& pixels, const Tensor& positions, at::TensorList u_rows,
               at::TensorList ul_rows, at::TensorList u_values) {
  check_cpu(pixels, at::kByte, 4, "pixels");
  check_cpu(positions, at::kLong, 2, "positions");
  const int64_t n = positions.size(0), height = pixels.size(2), width = pixels.size(3);
  TORCH_CHECK(pixels.size(0) == n && pixels.size(1) == 1 && positions.size(1) == 1,
              "pixels, positions: expected (n, 1, H, W) and (n, 1) for n = ", n, ", got ", pixels.sizes(), " and ",
              positions.sizes());
  TORCH_CHECK(width % (int64_t{1} << (w.scales - 1)) == 0, "pixels: width ", width, " does not halve ",
              w.scales - 1, " times");
  Call call{pixels.data_ptr<uint8_t>(), positions.data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr, nullptr,
            {}, {}, {}, {}, n, height, width};
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK(call.positions[s] >= 0 && call.positions[s] % width == 0 && call.positions[s] < height * width,
                "positions: slot ", s, " at ", call.positions[s], " is not a row start: a call samples whole rows");
  for (int64_t s = 0; s < w.scales; ++s) call.layouts.emplace_back(w, s);
  auto take = [&](at::TensorList states, const char* name, bool rows, std::vector<float*>& out) {
    if (states.empty()) return;
    TORCH_CHECK(static_cast<int64_t>(states.size()) == w.scales, name, ": ", states.size(), " states for ", w.scales,
                " resolutions");
    for (int64_t s = 0; s < w.scales; ++s) {
      check_cpu(states[s], at::kFloat, 3, name);
      const int64_t channels = rows ? call.layouts[s].rows : call.layouts[s].values;
      TORCH_CHECK(states[s].sizes() == at::IntArrayRef({n, channels, width >> s}), name, s, ": expected (", n, ", ",
                  channels, ", ", width >> s, "), got ", states[s].sizes());
      out.push_back(states[s].data_ptr<float>());
    }
  };
  take(u_rows, "u_rows", true, call.u_rows);
  take(ul_rows, "ul_rows", true, call.ul_rows);
  take(u_values, "u_values", false, call.u_values);
  return call;
}

void set_controls(const PPWeights& w, Call& call, const Tensor& noise, const Tensor& temperature,
                  const std::optional<Tensor>& teacher, Tensor& pixel, Tensor* logits) {
  check_cpu(noise, at::kFloat, 3, "noise");
  check_cpu(temperature, at::kFloat, 2, "temperature");
  TORCH_CHECK(noise.size(0) == call.n && noise.size(1) == call.width && noise.size(2) == 1,
              "noise: a call samples whole rows, expected (", call.n, ", ", call.width, ", 1), got ", noise.sizes());
  TORCH_CHECK(temperature.size(0) == call.n && temperature.size(1) == 1, "temperature: expected (", call.n,
              ", 1), got ", temperature.sizes());
  call.noise = noise.data_ptr<float>();
  call.temperature = temperature.data_ptr<float>();
  call.pixel = pixel.data_ptr<int64_t>();
  if (teacher.has_value()) {
    check_cpu(*teacher, at::kLong, 3, "teacher");
    TORCH_CHECK(teacher->sizes() == noise.sizes(), "teacher: expected ", noise.sizes(), ", got ", teacher->sizes());
    call.teacher = teacher->data_ptr<int64_t>();
    for (int64_t i = 0; i < teacher->numel(); ++i)
      TORCH_CHECK(call.teacher[i] >= 0 && call.teacher[i] < w.levels, "teacher: level ", call.teacher[i],
                  " outside [0, ", w.levels, ")");
    call.logits = logits->data_ptr<float>();
  }
}

// Runs `phase(slots, m, live)` on blocks of up to kSlotBlock slots whose rows have the same resolutions live,
// formed in slot order (so no slot's arithmetic depends on the thread count).
template <class Phase>
void for_blocks(const Call& call, Phase phase) {
  std::vector<std::vector<int64_t>> by_live(call.layouts.size() + 1);
  for (int64_t s = 0; s < call.n; ++s) by_live[call.live(s)].push_back(s);
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (live, first index into by_live[live])
  for (size_t live = 1; live < by_live.size(); ++live)
    for (size_t first = 0; first < by_live[live].size(); first += kSlotBlock) blocks.emplace_back(live, first);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [live, first] = blocks[b];
      const std::vector<int64_t>& slots = by_live[live];
      phase(slots.data() + first, std::min<int64_t>(kSlotBlock, slots.size() - first), live);
    }
  });
}

std::vector<Tensor> clones(at::TensorList states) {
  std::vector<Tensor> out;
  for (const Tensor& state : states) out.push_back(state.clone());
  return out;
}

std::vector<Tensor> pixelcnn_pp_refresh(const Tensor& pixels, const Tensor& positions, at::TensorList u_rows,
                                        at::TensorList weights) {
  const PPWeights w(weights);
  std::vector<Tensor> out = clones(u_rows);
  Call call = make_call(w, pixels, positions, out, {}, {});
  for (int64_t s = 0; s < w.scales; ++s) {  // the values: written where live, zeros elsewhere
    out.push_back(at::zeros({call.n, call.layouts[s].values, call.width >> s}, pixels.options().dtype(at::kFloat)));
    call.u_values.push_back(out.back().data_ptr<float>());
  }
  for_blocks(call, [&](const int64_t* slots, int64_t m, int64_t live) { refresh_block(w, call, slots, m, live); });
  return out;
}

std::vector<Tensor> pixelcnn_pp_step(const Tensor& positions, const Tensor& pixels, const Tensor& noise,
                                     const Tensor& temperature, at::TensorList ul_rows, at::TensorList u_values,
                                     const std::optional<Tensor>& teacher, at::TensorList weights) {
  const PPWeights w(weights);
  std::vector<Tensor> out{at::empty({positions.size(0), noise.size(1), 1}, positions.options())};
  for (const Tensor& state : clones(ul_rows)) out.push_back(state);
  Tensor logits;
  if (teacher.has_value()) logits = at::empty({positions.size(0), noise.size(1), w.levels}, noise.options());
  Call call = make_call(w, pixels, positions, {}, at::TensorList(out).slice(1), u_values);
  TORCH_CHECK(!call.u_values.empty(), "u_values: the refresh's values are needed");
  set_controls(w, call, noise, temperature, teacher, out[0], &logits);
  for_blocks(call, [&](const int64_t* slots, int64_t m, int64_t live) { step_block(w, call, slots, m, live); });
  if (teacher.has_value()) out.push_back(logits);
  return out;
}

// Refresh, then step, on every slot, the states (u_rows, ul_rows, u_values, per resolution) in place.
Tensor row_call(const PPWeights& w, const Tensor& pixels, const Tensor& positions, const Tensor& noise,
                const Tensor& temperature, at::TensorList states) {
  TORCH_CHECK(static_cast<int64_t>(states.size()) == 3 * w.scales, "states: expected u_rows, ul_rows and u_values for ",
              w.scales, " resolutions, got ", states.size(), " tensors");
  Tensor pixel = at::empty({positions.size(0), pixels.size(3), 1}, positions.options());
  Call call = make_call(w, pixels, positions, states.slice(0, w.scales), states.slice(w.scales, w.scales),
                        states.slice(2 * w.scales));
  set_controls(w, call, noise, temperature, std::nullopt, pixel, nullptr);
  for_blocks(call, [&](const int64_t* slots, int64_t m, int64_t live) {
    refresh_block(w, call, slots, m, live);
    step_block(w, call, slots, m, live);
  });
  return pixel;
}

Tensor pixelcnn_pp_row(const Tensor& pixels, const Tensor& positions, const Tensor& noise, const Tensor& temperature,
                       at::TensorList states, at::TensorList weights) {
  return row_call(PPWeights(weights), pixels, positions, noise, temperature, states);
}

void pixelcnn_pp_rows(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                      const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights,
                      int64_t rows) {
  TORCH_CHECK(!labels.has_value(), "labels: this PixelCNN++ is unconditional");
  const PPWeights w(weights);
  for_rows(pixels, positions, noise, rows, [&](const Tensor& step_noise, bool) {
    return row_call(w, pixels, positions, step_noise, temperature, states);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("pixelcnn_pp_refresh(Tensor pixels, Tensor positions, Tensor[] u_rows, Tensor[] weights) -> Tensor[]");
  m.def("pixelcnn_pp_step(Tensor positions, Tensor pixels, Tensor noise, Tensor temperature, Tensor[] ul_rows,"
        " Tensor[] u_values, Tensor? teacher, Tensor[] weights) -> Tensor[]");
  m.def("pixelcnn_pp_row(Tensor pixels, Tensor positions, Tensor noise, Tensor temperature, Tensor(a!)[] states,"
        " Tensor[] weights) -> Tensor");
  m.def("pixelcnn_pp_rows(Tensor(a!) pixels, Tensor(b!) positions, Tensor? labels, Tensor noise, Tensor temperature,"
        " Tensor(c!)[] states, Tensor[] weights, int rows) -> ()");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) {
  m.impl("pixelcnn_pp_refresh", &pixelcnn_pp_refresh);
  m.impl("pixelcnn_pp_step", &pixelcnn_pp_step);
  m.impl("pixelcnn_pp_row", &pixelcnn_pp_row);
  m.impl("pixelcnn_pp_rows", &pixelcnn_pp_rows);
}

}  // namespace genserve
