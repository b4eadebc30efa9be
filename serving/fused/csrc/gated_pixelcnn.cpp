// Fused cached sampling for Gated PixelCNN (van den Oord et al. 2016) on the CPU.
//
// The same two-phase program as the exported step graphs (export/steps.py), on the same state
// tensors, so the engine can run either and a test can compare them call by call:
// - gated_refresh, at a row start: every layer's vertical stack for the whole row and its link
//   into the horizontal stack (a GEMM over (slot, column) rows), empty left contexts;
// - gated_step: `span` pixels per slot, each through every layer's horizontal stack, the skip
//   and output layers and the inverse-CDF choice, with no dispatch between layers.
// Weights arrive packed by `genserve export` (export/fused.py), every dense layer as (in, out).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "rows.h"

namespace genserve {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 14;  // (slot, column) rows per refresh block: half a 28-pixel row, in L1/L2
constexpr int64_t kGrain = 14;  // fewest rows worth a thread (a batch-1 row splits in two)

// The packed weights, in the order export/fused.py writes them.
struct GatedWeights {
  const float *v0_w, *v0_b, *v_w, *v_b, *link_w, *link_b, *h_b, *class_bias, *h0_w, *h_w, *hout_w, *hout_b,
      *skip_w, *skip_b, *oh_w, *oh_b, *lg_w, *lg_b;
  int64_t layers, channels, p0, p, classes, output_channels, levels;

  explicit GatedWeights(at::TensorList w) {
    TORCH_CHECK(w.size() == 18, "gated weights: expected 18 tensors, got ", w.size());
    for (const Tensor& t : w)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                  "gated weights must be contiguous float32 CPU tensors");
    const float** fields[] = {&v0_w, &v0_b, &v_w, &v_b, &link_w, &link_b, &h_b, &class_bias, &h0_w,
                              &h_w,  &hout_w, &hout_b, &skip_w, &skip_b, &oh_w, &oh_b, &lg_w, &lg_b};
    for (size_t i = 0; i < w.size(); ++i) *fields[i] = w[i].data_ptr<float>();
    layers = w[4].size(0);
    channels = w[10].size(1);
    p0 = w[8].size(0) - 1;
    p = w[9].size(1) / channels - 1;
    classes = w[7].dim() == 3 ? w[7].size(1) : 0;
    output_channels = w[14].size(1);
    levels = w[16].size(1);
    TORCH_CHECK(levels >= 2 && levels <= 256, "gated weights: 2..256 pixel levels, got ", levels);
  }
  float scale(int64_t level) const { return level_value(level, levels); }
};

// The refresh into given outputs: `vertical_out` may be `vertical` itself (each slot's cache is read
// before it is written); `links` is overwritten whole.
void refresh_into(const GatedWeights& w, const Tensor& pixels, const Tensor& positions,
                  const std::optional<Tensor>& labels, const Tensor& vertical, Tensor& vertical_out, Tensor& links) {
  check_cpu(pixels, at::kByte, 4, "pixels");
  check_cpu(positions, at::kLong, 2, "positions");
  check_cpu(vertical, at::kFloat, 5, "vertical");
  const int64_t n = pixels.size(0), height = pixels.size(2), width = pixels.size(3);
  const int64_t C = w.channels, C2 = 2 * C, L = w.layers, p0 = w.p0, p = w.p, k0 = 2 * p0 + 1, k = 2 * p + 1;
  TORCH_CHECK(pixels.size(1) == 1, "pixels: single-channel images only");
  TORCH_CHECK(vertical.size(0) == n && vertical.size(1) == L - 1 && vertical.size(2) == C && vertical.size(3) == p &&
                  vertical.size(4) == width,
              "vertical: shape ", vertical.sizes(), " does not match the weights");
  const int64_t* label = nullptr;
  if (w.classes) {
    TORCH_CHECK(labels.has_value(), "labels: a conditional model needs labels");
    check_cpu(*labels, at::kLong, 2, "labels");
    label = labels->data_ptr<int64_t>();
    for (int64_t s = 0; s < n; ++s)
      TORCH_CHECK(label[s] >= 0 && label[s] < w.classes, "labels: ", label[s], " outside [0, ", w.classes, ")");
  }
  TORCH_CHECK(links.sizes() == at::IntArrayRef({n, L, C2, width}) && links.is_contiguous() &&
                  vertical_out.sizes() == vertical.sizes() && vertical_out.is_contiguous(),
              "links, vertical: outputs of the wrong shape");
  if (n == 0) return;

  const uint8_t* pix = pixels.data_ptr<uint8_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* vin = vertical.data_ptr<float>();
  float* vout_state = vertical_out.data_ptr<float>();
  float* link_out = links.data_ptr<float>();

  const int64_t rows = n * width;  // one per (slot, column)
  const int64_t window_cols = std::max((p0 + 1) * k0, (p + 1) * k * C);
  // Layer l's gated outputs go to v_out[l % 3]: while threads compute layer l, the previous
  // layer's outputs are still read (its im2col) and so are those of the one before (its cache's shift).
  // Every element of these is written before it is read: no zeroing.
  float* const col = thread_scratch(rows * (window_cols + C2 + L * C2 + 3 * C));
  float* const pre = col + rows * window_cols;
  float* const link = pre + rows * C2;
  float* const v_out = link + L * rows * C2;
  auto gated = [&](int64_t l) { return v_out + l % 3 * rows * C; };

  // The shift of layer l's cache (rows i-p..i-1 of layer l-1's outputs) up one row, layer l-1's
  // outputs at row i entering last: a (slot, channel) per iteration, shared among the threads of
  // the enclosing region, which go on without waiting.
  auto shift_cache = [&](int64_t l) {
#pragma omp for schedule(static) nowait
    for (int64_t sc = 0; sc < n * C; ++sc) {
      const int64_t s = sc / C, c = sc % C;
      const float* cache = vin + ((s * (L - 1) + l - 1) * C + c) * p * width;  // (p, W)
      float* next = vout_state + ((s * (L - 1) + l - 1) * C + c) * p * width;
      for (int64_t r = 0; r + 1 < p; ++r) std::memmove(next + r * width, cache + (r + 1) * width, width * sizeof(float));
      const float* newest = gated(l - 1) + s * width * C + c;
      for (int64_t j = 0; j < width; ++j) next[(p - 1) * width + j] = newest[j * C];
    }
  };

  // One parallel region for the whole call, its threads meeting once per layer: a region (or a
  // barrier) more per layer costs more than the arithmetic at batch 1. Each thread's writes are
  // whole rows (or a channel's whole row of columns), never part of a cache line another writes.
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  const int threads = at::in_parallel_region() ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(),
                                                                                        (rows + kGrain - 1) / kGrain));
#pragma omp parallel num_threads(threads)
  {
    // This thread's window of a layer's input around one slot's columns ja..jb-1: rows i-p..i,
    // columns ja-p..jb+p-1 (zero outside the image), channels last.
    const int64_t span_cols = std::min(kBlock, width) + 2 * p;
    std::vector<float> window((p + 1) * span_cols * C);
    for (int64_t l = 0; l < L; ++l) {
      if (l >= 2) shift_cache(l - 1);  // the previous layer's cache: every thread has finished reading it
      const int64_t in = l == 0 ? (p0 + 1) * k0 : (p + 1) * k * C;
      const float* wv = l == 0 ? w.v0_w : w.v_w + (l - 1) * in * C2;
      const float* bv = l == 0 ? w.v0_b : w.v_b + (l - 1) * C2;
#pragma omp for schedule(static) nowait
      for (int64_t block = 0; block < blocks; ++block) {  // blocks small enough to stay in cache
        const int64_t r0 = block * kBlock, r1 = std::min(rows, r0 + kBlock), m = r1 - r0;
        if (l == 0) {
          for (int64_t r = r0; r < r1; ++r) {  // im2col: image rows i-1-p0..i-1 around column j
            const int64_t s = r / width, j = r % width, i = pos[s] / width;
            float* dst = col + r * window_cols;
            for (int64_t rr = 0; rr <= p0; ++rr)
              for (int64_t cc = 0; cc < k0; ++cc) {
                const int64_t ii = i - 1 - p0 + rr, jj = j - p0 + cc;
                dst[rr * k0 + cc] =
                    ii >= 0 && jj >= 0 && jj < width ? w.scale(pix[(s * height + ii) * width + jj]) : 0.f;
              }
          }
        } else {
          for (int64_t r = r0; r < r1;) {  // per slot within the block: its window, then im2col
            const int64_t s = r / width, ja = r % width, jb = std::min(width, ja + (r1 - r)), cols = jb - ja + 2 * p;
            const float* cache = vin + ((s * (L - 1) + l - 1) * C) * p * width;  // (C, p, W)
            const float* below = gated(l - 1) + s * width * C;                   // row i: (W, C)
            for (int64_t jj = ja - p; jj < jb + p; ++jj) {
              float* column = window.data() + (jj - ja + p) * C;
              const bool inside = jj >= 0 && jj < width;
              for (int64_t rr = 0; rr < p; ++rr)
                for (int64_t c = 0; c < C; ++c)
                  column[rr * cols * C + c] = inside ? cache[(c * p + rr) * width + jj] : 0.f;
              if (inside) std::memcpy(column + p * cols * C, below + jj * C, C * sizeof(float));
              else std::fill_n(column + p * cols * C, C, 0.f);
            }
            for (int64_t j = ja; j < jb; ++j, ++r)
              for (int64_t rr = 0; rr <= p; ++rr)
                std::memcpy(col + r * window_cols + rr * k * C, window.data() + (rr * cols + j - ja) * C,
                            k * C * sizeof(float));
          }
        }
        float* v = pre + r0 * C2;
        float* h = link + (l * rows + r0) * C2;
        dense(col + r0 * window_cols, window_cols, wv, in, C2, bv, v, C2, m);
        const float* hb = w.h_b + l * C2;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t s = r / width, j = r % width;
          if (l == 0 && pos[s] < width) std::fill_n(v + (r - r0) * C2, C2, 0.f);  // shift down: row 0 is zero
          const bool horizontal_bias = l > 0 || j > 0;  // the first layer's shift right: column 0 has no bias
          for (int64_t o = 0; o < C2; ++o) h[(r - r0) * C2 + o] = horizontal_bias ? hb[o] : 0.f;
        }
        dense(v, C2, w.link_w + l * C2 * C2, C2, C2, w.link_b + l * C2, h, C2, m, true);
        if (label)  // the class biases: the vertical gate's after the link, the horizontal one's in it
          for (int64_t r = r0; r < r1; ++r) {
            const float* cb = w.class_bias + (l * w.classes + label[r / width]) * 2 * C2;
            for (int64_t o = 0; o < C2; ++o) v[(r - r0) * C2 + o] += cb[o], h[(r - r0) * C2 + o] += cb[C2 + o];
          }
        if (l < L - 1) gate_rows(v, C2, gated(l) + r0 * C, C, C, m);
      }
#pragma omp barrier
    }
    if (L >= 2) shift_cache(L - 1);
    // The links into their (slot, layer, channel, column) layout, a channel's columns by one thread.
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n * L * C2; ++row) {
      const int64_t s = row / (L * C2), l = row / C2 % L, o = row % C2;
      const float* src = link + (l * rows + s * width) * C2 + o;
      float* dst = link_out + row * width;
      for (int64_t j = 0; j < width; ++j) dst[j] = src[j * C2];
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_refresh(const Tensor& pixels, const Tensor& positions,
                                                         const std::optional<Tensor>& labels, const Tensor& vertical,
                                                         at::TensorList weights) {
  const GatedWeights w(weights);
  check_cpu(vertical, at::kFloat, 5, "vertical");
  const int64_t n = vertical.size(0), width = vertical.size(4), L = w.layers, C = w.channels;
  Tensor vertical_out = at::empty_like(vertical);
  Tensor links = at::empty({n, L, 2 * C, width}, vertical.options());
  refresh_into(w, pixels, positions, labels, vertical, vertical_out, links);
  return {vertical_out, links, at::zeros({n, w.p0 + 1}, vertical.options()),
          at::zeros({n, L - 1, w.p * C}, vertical.options())};
}

// The step into given outputs: `image_out` holds the image context on entry and is advanced in
// place; `hidden_out` may be `hidden_context` itself (each slot block reads it before writing).
void step_into(const GatedWeights& w, const Tensor& positions, const Tensor& noise, const Tensor& temperature,
               const Tensor& links, Tensor& image_out, const Tensor& hidden_context, Tensor& hidden_out,
               const std::optional<Tensor>& teacher, Tensor& pixel, Tensor& logits_out) {
  const Tensor& image_context = image_out;
  check_cpu(positions, at::kLong, 2, "positions");
  check_cpu(noise, at::kFloat, 3, "noise");
  check_cpu(temperature, at::kFloat, 2, "temperature");
  check_cpu(links, at::kFloat, 4, "links");
  check_cpu(image_context, at::kFloat, 2, "image_context");
  check_cpu(hidden_context, at::kFloat, 3, "hidden_context");
  const int64_t n = positions.size(0), span = noise.size(1), width = links.size(3);
  const int64_t C = w.channels, C2 = 2 * C, L = w.layers, p0 = w.p0, p = w.p, O = w.output_channels;
  const int64_t levels = w.levels, hidden = (p + 1) * C;
  TORCH_CHECK(noise.size(2) == 1, "noise: single-channel images only");
  TORCH_CHECK(links.size(1) == L && links.size(2) == C2, "links: shape ", links.sizes(), " does not match the weights");
  TORCH_CHECK(image_context.size(1) == p0 + 1 && hidden_context.size(1) == L - 1 && hidden_context.size(2) == p * C,
              "contexts: shapes ", image_context.sizes(), " and ", hidden_context.sizes(), " do not match the weights");
  const int64_t* forced = nullptr;
  if (teacher.has_value()) {
    check_cpu(*teacher, at::kLong, 3, "teacher");
    forced = teacher->data_ptr<int64_t>();
  }
  TORCH_CHECK(pixel.sizes() == at::IntArrayRef({n, span, 1}) && hidden_out.sizes() == hidden_context.sizes() &&
                  hidden_out.is_contiguous() && logits_out.numel() == (forced ? n * span * levels : 0),
              "pixel, hidden_context, logits: outputs of the wrong shape");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* eps = noise.data_ptr<float>();
  const float* temp = temperature.data_ptr<float>();
  const float* link = links.data_ptr<float>();
  const float* hidden_in = hidden_context.data_ptr<float>();
  float* context = image_out.data_ptr<float>();
  float* hidden_state = hidden_out.data_ptr<float>();
  int64_t* chosen = pixel.data_ptr<int64_t>();
  float* logits_record = logits_out.data_ptr<float>();

  // Slots are independent: blocks of slots run on the intra-op threads, each block layer by layer.
  at::parallel_for(0, n, 8, [&](int64_t b0, int64_t b1) {
    const int64_t m = b1 - b0;
    std::vector<float> windows((L - 1) * m * hidden), pre(m * C2), gated(m * L * C), h_out(m * C), skips(m * C),
        out_hidden(m * O), logits(m * levels);
    for (int64_t l = 0; l < L - 1; ++l)  // layer l+1's window: layer l's last p outputs, then its current one
      for (int64_t s = 0; s < m; ++s)
        std::memcpy(windows.data() + (l * m + s) * hidden, hidden_in + ((b0 + s) * (L - 1) + l) * p * C,
                    p * C * sizeof(float));
    float* ctx = context + b0 * (p0 + 1);
    auto gather_links = [&](int64_t l, int64_t offset) {  // the link of column j of layer l, per slot
      for (int64_t s = 0; s < m; ++s) {
        const int64_t j = pos[b0 + s] % width + offset;
        const float* src = link + ((b0 + s) * L + l) * C2 * width + j;
        for (int64_t o = 0; o < C2; ++o) pre[s * C2 + o] = src[o * width];
      }
    };
    for (int64_t t = 0; t < span; ++t) {
      gather_links(0, t);
      dense(ctx, p0 + 1, w.h0_w, p0 + 1, C2, nullptr, pre.data(), C2, m, true);
      gate_rows(pre.data(), C2, gated.data(), L * C, C, m);
      dense(gated.data(), L * C, w.hout_w, C, C, w.hout_b, h_out.data(), C, m);
      for (int64_t l = 1; l < L; ++l) {
        float* win = windows.data() + (l - 1) * m * hidden;
        for (int64_t s = 0; s < m; ++s) std::memcpy(win + s * hidden + p * C, h_out.data() + s * C, C * sizeof(float));
        gather_links(l, t);
        dense(win, hidden, w.h_w + (l - 1) * hidden * C2, hidden, C2, nullptr, pre.data(), C2, m, true);
        for (int64_t s = 0; s < m; ++s)  // drop the oldest column
          std::memmove(win + s * hidden, win + s * hidden + C, p * C * sizeof(float));
        gate_rows(pre.data(), C2, gated.data() + l * C, L * C, C, m);
        if (l < L - 1)  // residual: h_out += horizontal_out(gated); the last layer's feeds nothing
          dense(gated.data() + l * C, L * C, w.hout_w + l * C * C, C, C, w.hout_b + l * C, h_out.data(), C, m, true);
      }
      dense(gated.data(), L * C, w.skip_w, L * C, C, w.skip_b, skips.data(), C, m);
      relu_rows(skips.data(), C, C, m);
      dense(skips.data(), C, w.oh_w, C, O, w.oh_b, out_hidden.data(), O, m);
      relu_rows(out_hidden.data(), O, O, m);
      dense(out_hidden.data(), O, w.lg_w, O, levels, w.lg_b, logits.data(), levels, m);
      for (int64_t s = 0; s < m; ++s) {
        const int64_t slot = b0 + s;
        const int64_t value = chosen[slot * span + t] = pick_level(
            logits.data() + s * levels, levels, slot * span + t, forced, eps, temp[slot], logits_record);
        float* c = ctx + s * (p0 + 1);
        std::memmove(c, c + 1, p0 * sizeof(float));
        c[p0] = w.scale(value);
      }
    }
    for (int64_t l = 0; l < L - 1; ++l)
      for (int64_t s = 0; s < m; ++s)
        std::memcpy(hidden_state + ((b0 + s) * (L - 1) + l) * p * C, windows.data() + (l * m + s) * hidden,
                    p * C * sizeof(float));
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_step(const Tensor& positions, const Tensor& noise,
                                                      const Tensor& temperature, const Tensor& links,
                                                      const Tensor& image_context, const Tensor& hidden_context,
                                                      const std::optional<Tensor>& teacher, at::TensorList weights) {
  const GatedWeights w(weights);
  const int64_t n = positions.size(0), span = noise.size(1);
  Tensor pixel = at::empty({n, span, 1}, positions.options());
  Tensor image_out = image_context.clone();
  Tensor hidden_out = at::empty_like(hidden_context);
  Tensor logits_out = at::empty({teacher.has_value() ? n : 0, span, w.levels}, links.options());
  step_into(w, positions, noise, temperature, links, image_out, hidden_context, hidden_out, teacher, pixel, logits_out);
  return {pixel, image_out, hidden_out, logits_out};
}

// A whole row for slots that all start one: the refresh and the step in one call, the states
// (vertical, links, image_context, hidden_context) updated in place. Returns the pixels.
Tensor gated_row(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                 const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights) {
  const GatedWeights w(weights);
  TORCH_CHECK(states.size() == 4, "states: expected vertical, links, image_context, hidden_context");
  Tensor vertical = states[0], links = states[1], image_context = states[2], hidden_context = states[3];
  refresh_into(w, pixels, positions, labels, vertical, vertical, links);
  image_context.zero_();
  hidden_context.zero_();
  Tensor pixel = at::empty({positions.size(0), noise.size(1), 1}, positions.options());
  Tensor no_logits = at::empty({0}, links.options());
  step_into(w, positions, noise, temperature, links, image_context, hidden_context, hidden_context, std::nullopt,
            pixel, no_logits);
  return pixel;
}

// `rows` whole rows in one call (rows.h): the images and positions advanced in place.
void gated_rows(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights,
                int64_t rows) {
  for_rows(pixels, positions, noise, rows, [&](const Tensor& step_noise) {
    return gated_row(pixels, positions, labels, step_noise, temperature, states, weights);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("gated_refresh(Tensor pixels, Tensor positions, Tensor? labels, Tensor vertical, Tensor[] weights)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_step(Tensor positions, Tensor noise, Tensor temperature, Tensor links, Tensor image_context,"
        " Tensor hidden_context, Tensor? teacher, Tensor[] weights) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_row(Tensor pixels, Tensor positions, Tensor? labels, Tensor noise, Tensor temperature,"
        " Tensor(a!)[] states, Tensor[] weights) -> Tensor");
  m.def("gated_rows(Tensor(a!) pixels, Tensor(b!) positions, Tensor? labels, Tensor noise, Tensor temperature,"
        " Tensor(c!)[] states, Tensor[] weights, int rows) -> ()");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) {
  m.impl("gated_refresh", &gated_refresh);
  m.impl("gated_step", &gated_step);
  m.impl("gated_row", &gated_row);
  m.impl("gated_rows", &gated_rows);
}

}  // namespace genserve
