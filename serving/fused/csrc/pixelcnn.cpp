// Fused cached sampling for PixelCNN (van den Oord et al. 2016, masked convolutions) on the CPU.
//
// The same program as the exported step graphs (export/steps.py), on the same row caches:
// - pixelcnn_refresh, at a row start: every cache moves up one row, the new row empty;
// - pixelcnn_step: `span` pixels per slot, each through the masked input layer, every residual
//   block (its masked layer read from the block's row cache) and the output layers, then the
//   inverse-CDF choice, with no dispatch between layers.
// Weights arrive packed by `genserve export` (export/fused.py): dense layers (in, out), masked
// kernels cut to their rows above and at the centre and flattened (channel, row, column).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"
#include "rows.h"

namespace genserve {
namespace {

using at::Tensor;

struct PixelCNNWeights {
  const float *in_w, *in_b, *reduce_w, *reduce_b, *masked_w, *masked_b, *expand_w, *expand_b, *oh_w, *oh_b, *lg_w,
      *lg_b;
  int64_t blocks, hidden, output_channels, levels;

  explicit PixelCNNWeights(at::TensorList w) {
    TORCH_CHECK(w.size() == 12, "pixelcnn weights: expected 12 tensors, got ", w.size());
    for (const Tensor& t : w)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                  "pixelcnn weights must be contiguous float32 CPU tensors");
    const float** fields[] = {&in_w, &in_b, &reduce_w, &reduce_b, &masked_w, &masked_b,
                              &expand_w, &expand_b, &oh_w, &oh_b, &lg_w, &lg_b};
    for (size_t i = 0; i < w.size(); ++i) *fields[i] = w[i].data_ptr<float>();
    blocks = w[2].size(0);
    hidden = w[1].size(0) / 2;
    output_channels = w[8].size(1);
    levels = w[10].size(1);
    TORCH_CHECK(levels >= 2 && levels <= 256, "pixelcnn weights: 2..256 pixel levels, got ", levels);
  }
  float scale(int64_t level) const { return level_value(level, levels); }
};

std::vector<Tensor> pixelcnn_refresh(const Tensor& image_rows, at::TensorList block_rows, at::TensorList weights) {
  std::vector<Tensor> out;
  out.reserve(block_rows.size() + 1);
  for (size_t c = 0; c <= block_rows.size(); ++c) {
    const Tensor& rows = c == 0 ? image_rows : block_rows[c - 1];
    TORCH_CHECK(rows.dim() == 4 && rows.device().is_cpu(), "row caches: expected (n, C, R, W) CPU tensors");
    out.push_back(at::cat({rows.slice(2, 1), at::zeros_like(rows.slice(2, 0, 1))}, 2));
  }
  return out;
}

// Copies the (C, R, k) window at padded columns j..j+k-1 of a (C, R, Wp) row cache, (channel, row, column) order.
// A loop rather than a memcpy per (channel, row): a call per k (3 to 7) floats cost ~1.5 µs a pixel.
inline void gather_window(const float* rows, int64_t channels, int64_t R, int64_t padded, int64_t j, int64_t k,
                          float* dst) {
  for (int64_t cr = 0; cr < channels * R; ++cr)
    for (int64_t kk = 0; kk < k; ++kk) dst[cr * k + kk] = rows[cr * padded + j + kk];
}

// Every row cache (n, C, R, Wp) moves up one row in place, the new last row zero: the refresh.
void roll_rows(at::TensorList caches) {
  for (const Tensor& rows : caches) {
    TORCH_CHECK(rows.dim() == 4 && rows.size(2) >= 1 && rows.is_contiguous() && rows.scalar_type() == at::kFloat &&
                    rows.device().is_cpu(),
                "row caches: expected contiguous (n, C, R >= 1, W) float32 CPU tensors, got ", rows.sizes());
    const int64_t R = rows.size(2), padded = rows.size(3);
    float* data = rows.data_ptr<float>();
    for (int64_t nc = 0; nc < rows.size(0) * rows.size(1); ++nc) {
      float* cache = data + nc * R * padded;
      std::memmove(cache, cache + padded, (R - 1) * padded * sizeof(float));
      std::fill_n(cache + (R - 1) * padded, padded, 0.f);
    }
  }
}

// The step on caches updated in place (contiguous float32): pixels into `pixel`, logits (teacher only).
void step_into(const PixelCNNWeights& w, const Tensor& positions, const Tensor& noise, const Tensor& temperature,
               Tensor& image_rows, at::TensorList block_rows, const std::optional<Tensor>& teacher, Tensor& pixel,
               Tensor& logits_out) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.is_contiguous(),
              "positions: expected (n, 1) int64");
  TORCH_CHECK(noise.scalar_type() == at::kFloat && noise.dim() == 3 && noise.size(2) == 1 && noise.is_contiguous(),
              "noise: expected (n, span, 1) float32 (single-channel images only)");
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && temperature.is_contiguous(), "temperature: expected float32");
  TORCH_CHECK(image_rows.scalar_type() == at::kFloat && image_rows.dim() == 4 && image_rows.size(1) == 1 &&
                  image_rows.is_contiguous(),
              "image_rows: expected (n, 1, p0+1, W+2p0) float32");
  TORCH_CHECK(static_cast<int64_t>(block_rows.size()) == w.blocks, "block_rows: ", block_rows.size(),
              " caches for ", w.blocks, " blocks");
  const int64_t n = positions.size(0), span = noise.size(1), h = w.hidden, h2 = 2 * h, O = w.output_channels;
  const int64_t levels = w.levels, R0 = image_rows.size(2), p0 = R0 - 1, k0 = 2 * p0 + 1;
  const int64_t padded0 = image_rows.size(3), width = padded0 - 2 * p0;
  const int64_t R = w.blocks ? block_rows[0].size(2) : 1, p = R - 1, k = 2 * p + 1, padded = width + 2 * p;
  for (const Tensor& rows : block_rows)
    TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 4 && rows.size(1) == h && rows.size(2) == R &&
                    rows.size(3) == padded && rows.is_contiguous(),
                "block rows: shape ", rows.sizes(), " does not match the weights");
  const int64_t* forced = nullptr;
  if (teacher.has_value()) {
    TORCH_CHECK(teacher->scalar_type() == at::kLong && teacher->is_contiguous(), "teacher: expected int64");
    forced = teacher->data_ptr<int64_t>();
  }
  TORCH_CHECK(pixel.sizes() == at::IntArrayRef({n, span, 1}) && logits_out.numel() == (forced ? n * span * levels : 0),
              "pixel, logits: outputs of the wrong shape");
  int64_t* chosen = pixel.data_ptr<int64_t>();
  float* image = image_rows.data_ptr<float>();
  std::vector<float*> caches;
  for (int64_t b = 0; b < w.blocks; ++b) caches.push_back(block_rows[b].data_ptr<float>());
  float* logits_record = logits_out.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* eps = noise.data_ptr<float>();
  const float* temp = temperature.data_ptr<float>();
  const int64_t in0 = R0 * k0, window = h * R * k;

  at::parallel_for(0, n, 8, [&](int64_t b0, int64_t b1) {
    const int64_t m = b1 - b0;
    std::vector<float> x(m * h2), act(m * h2), reduced(m * h), win(m * std::max(in0, window)), masked(m * h),
        out_hidden(m * O), logits(m * levels);
    for (int64_t t = 0; t < span; ++t) {
      for (int64_t s = 0; s < m; ++s)
        gather_window(image + (b0 + s) * R0 * padded0, 1, R0, padded0, pos[b0 + s] % width + t, k0,
                      win.data() + s * in0);
      dense(win.data(), in0, w.in_w, in0, h2, w.in_b, x.data(), h2, m);
      for (int64_t b = 0; b < w.blocks; ++b) {
        std::memcpy(act.data(), x.data(), m * h2 * sizeof(float));
        relu_rows(act.data(), h2, h2, m);
        dense(act.data(), h2, w.reduce_w + b * h2 * h, h2, h, w.reduce_b + b * h, reduced.data(), h, m);
        relu_rows(reduced.data(), h, h, m);
        for (int64_t s = 0; s < m; ++s) {  // the block's input at this pixel joins its row cache, then its window
          float* rows = caches[b] + (b0 + s) * h * R * padded;
          const int64_t j = pos[b0 + s] % width + t;
          for (int64_t c = 0; c < h; ++c) rows[(c * R + p) * padded + j + p] = reduced[s * h + c];
          gather_window(rows, h, R, padded, j, k, win.data() + s * window);
        }
        dense(win.data(), window, w.masked_w + b * window * h, window, h, w.masked_b + b * h, masked.data(), h, m);
        relu_rows(masked.data(), h, h, m);
        dense(masked.data(), h, w.expand_w + b * h * h2, h, h2, w.expand_b + b * h2, x.data(), h2, m, true);
      }
      relu_rows(x.data(), h2, h2, m);
      dense(x.data(), h2, w.oh_w, h2, O, w.oh_b, out_hidden.data(), O, m);
      relu_rows(out_hidden.data(), O, O, m);
      dense(out_hidden.data(), O, w.lg_w, O, levels, w.lg_b, logits.data(), levels, m);
      for (int64_t s = 0; s < m; ++s) {
        const int64_t slot = b0 + s;
        const int64_t value = chosen[slot * span + t] = pick_level(
            logits.data() + s * levels, levels, slot * span + t, forced, eps, temp[slot], logits_record);
        image[(slot * R0 + p0) * padded0 + pos[slot] % width + t + p0] = w.scale(value);
      }
    }
  });
}

std::vector<Tensor> pixelcnn_step(const Tensor& positions, const Tensor& noise, const Tensor& temperature,
                                  const Tensor& image_rows, at::TensorList block_rows,
                                  const std::optional<Tensor>& teacher, at::TensorList weights) {
  const PixelCNNWeights w(weights);
  const int64_t n = positions.size(0), span = noise.size(1);
  std::vector<Tensor> out;  // pixel, the caches (copies, then written), logits
  out.push_back(at::empty({n, span, 1}, positions.options()));
  out.push_back(image_rows.contiguous().clone());
  for (const Tensor& rows : block_rows) out.push_back(rows.contiguous().clone());
  out.push_back(at::empty({teacher.has_value() ? n : 0, span, w.levels}, image_rows.options()));
  step_into(w, positions, noise, temperature, out[1], at::TensorList(out).slice(2, block_rows.size()), teacher,
            out[0], out.back());
  return out;
}

// A whole row for slots that all start one: the caches roll up a row and the step runs, in place
// on `states` (image_rows, then each block's rows). Returns the pixels.
Tensor pixelcnn_row(const Tensor& positions, const Tensor& noise, const Tensor& temperature, at::TensorList states,
                    at::TensorList weights) {
  const PixelCNNWeights w(weights);
  TORCH_CHECK(static_cast<int64_t>(states.size()) == w.blocks + 1, "states: image_rows and one cache per block");
  roll_rows(states);
  Tensor image_rows = states[0];
  Tensor pixel = at::empty({positions.size(0), noise.size(1), 1}, positions.options());
  Tensor no_logits = at::empty({0}, image_rows.options());
  step_into(w, positions, noise, temperature, image_rows, states.slice(1), std::nullopt, pixel, no_logits);
  return pixel;
}

// `rows` whole rows in one call (rows.h): the images and positions advanced in place. An
// unconditional family: `labels` is accepted for the engine's one signature and must be None.
void pixelcnn_rows(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                   const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights,
                   int64_t rows) {
  TORCH_CHECK(!labels.has_value(), "labels: PixelCNN is unconditional");
  for_rows(pixels, positions, noise, rows, [&](const Tensor& step_noise, bool) {
    return pixelcnn_row(positions, step_noise, temperature, states, weights);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("pixelcnn_refresh(Tensor image_rows, Tensor[] block_rows, Tensor[] weights) -> Tensor[]");
  m.def("pixelcnn_step(Tensor positions, Tensor noise, Tensor temperature, Tensor image_rows, Tensor[] block_rows,"
        " Tensor? teacher, Tensor[] weights) -> Tensor[]");
  m.def("pixelcnn_row(Tensor positions, Tensor noise, Tensor temperature, Tensor(a!)[] states, Tensor[] weights)"
        " -> Tensor");
  m.def("pixelcnn_rows(Tensor(a!) pixels, Tensor(b!) positions, Tensor? labels, Tensor noise, Tensor temperature,"
        " Tensor(c!)[] states, Tensor[] weights, int rows) -> ()");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) {
  m.impl("pixelcnn_refresh", &pixelcnn_refresh);
  m.impl("pixelcnn_step", &pixelcnn_step);
  m.impl("pixelcnn_row", &pixelcnn_row);
  m.impl("pixelcnn_rows", &pixelcnn_rows);
}

}  // namespace genserve
