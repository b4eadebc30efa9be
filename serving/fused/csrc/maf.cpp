// Fused cached sampling for MAF (Papamakarios et al. 2017) on the CPU: its inverse, a pixel at a time.
//
// The same program as the exported step graph (export/steps.py, MAFStep), on the same states and
// in float64 as it is: at pixel i the latent's entry u_i passes down the layers, each layer's
// (mu_i, s_i) read off its hidden units' cached pre-activations W1 a_<i + b1, which then take the
// new value's column of W1. That is O(hidden units) per layer and pixel, which the graph spends
// ~15 operator dispatches on; here it is two dot products and an axpy with nothing between.
// Weights arrive packed by `genserve export` (export/fused.py): each indexed by the pixel first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "rows.h"

namespace genserve {
namespace {

using at::Tensor;

// Slots per task, stepped together pixel by pixel: a pixel's weights (the shipped model's 30 KB, 24 MB for
// the image: more than the caches hold) are read from memory once per block of slots, not once per slot.
constexpr int64_t kSlotBlock = 8;

// The packed weights, in the order export/fused.py writes them: columns, shift_rows, scale_rows
// (D, K, H), shift_bias, scale_bias (D, K), and the constants (alpha, pixel levels, the log-scale
// bound, the image width).
struct MAFWeights {
  const double *columns, *shift_rows, *scale_rows, *shift_bias, *scale_bias;
  int64_t dims, layers, hidden, levels, width;
  double alpha, bound;

  explicit MAFWeights(at::TensorList w) {
    TORCH_CHECK(w.size() == 6, "maf weights: expected 6 tensors, got ", w.size());
    for (const Tensor& t : w)
      TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.device().is_cpu(),
                  "maf weights must be contiguous float64 CPU tensors");
    dims = w[0].size(0);
    layers = w[0].size(1);
    hidden = w[0].size(2);
    for (int i = 1; i < 3; ++i)
      TORCH_CHECK(w[i].sizes() == w[0].sizes(), "maf weights: rows of shape ", w[i].sizes(), " for columns of ",
                  w[0].sizes());
    TORCH_CHECK(w[3].sizes() == at::IntArrayRef({dims, layers}) && w[4].sizes() == w[3].sizes() && w[5].numel() == 4,
                "maf weights: biases or constants of the wrong shape");
    columns = w[0].data_ptr<double>();
    shift_rows = w[1].data_ptr<double>();
    scale_rows = w[2].data_ptr<double>();
    shift_bias = w[3].data_ptr<double>();
    scale_bias = w[4].data_ptr<double>();
    const double* constants = w[5].data_ptr<double>();
    alpha = constants[0];
    levels = static_cast<int64_t>(constants[1]);
    bound = constants[2];
    width = static_cast<int64_t>(constants[3]);
    TORCH_CHECK(levels >= 2 && width >= 1 && dims % width == 0, "maf weights: constants ", w[5]);
  }
};

// Eight doubles: the partial sums of a dot product, or one value per slot of a block.
typedef double vd __attribute__((vector_size(8 * sizeof(double))));
typedef int64_t vl __attribute__((vector_size(8 * sizeof(int64_t))));
static_assert(kSlotBlock <= 8, "step_block keeps a block's slots in the lanes of a vd");

inline vd loadd(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// sum_j relu(h_j) x_j and sum_j relu(h_j) y_j, in 8 partial sums each (independent chains): partial q
// takes the terms j = q mod 8, held in lane q of a vector. Written as scalar loops over q, the compiler
// vectorised them with lane shuffles and scalar adds that took most of a batch-64 step.
inline void relu_dots(const double* h, const double* x, const double* y, int64_t count, double& dot_x,
                      double& dot_y) {
  vd vx = {}, vy = {};
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const vd hj = loadd(h + j);
    const vd r = hj > 0. ? hj : vd{};
    vx += r * loadd(x + j);
    vy += r * loadd(y + j);
  }
  double sx[8], sy[8];
  std::memcpy(sx, &vx, sizeof sx);
  std::memcpy(sy, &vy, sizeof sy);
  for (; j < count; ++j) {
    const double r = h[j] > 0. ? h[j] : 0.;
    sx[0] += r * x[j];
    sy[0] += r * y[j];
  }
  dot_x = ((sx[0] + sx[1]) + (sx[2] + sx[3])) + ((sx[4] + sx[5]) + (sx[6] + sx[7]));
  dot_y = ((sy[0] + sy[1]) + (sy[2] + sy[3])) + ((sy[4] + sy[5]) + (sy[6] + sy[7]));
}

// exp on every lane (Cephes' exp: exp(r) for |r| <= ln 2 / 2 as a Pade form, times 2^n; within 2 ulps of libm's),
// inputs clamped to [-708, 709], where the result stays a normal double. One call per slot of libm's exp
// and tanh took a third of a batch-64 step.
inline vd expv(vd x) {
  x = x > 709. ? vd{} + 709. : x;
  x = x < -708. ? vd{} - 708. : x;
  const vd magic = vd{} + 6755399441055744.;  // 1.5 * 2^52: adding it rounds to an integer
  const vd n = (x * 1.4426950408889634074 + magic) - magic;
  x = x - n * 6.93145751953125e-1;  // ln 2 in two parts: the first has few bits, so n times it is exact
  x = x - n * 1.42860682030941723212e-6;
  const vd xx = x * x;
  const vd p = x * ((1.26177193074810590878e-4 * xx + 3.02994407707441961300e-2) * xx + 9.99999999999999999910e-1);
  const vd q = ((3.00198505138664455042e-6 * xx + 2.52448340349684104192e-3) * xx + 2.27265548208155028766e-1) * xx +
               2.00000000000000000009;
  const vl bits = (__builtin_convertvector(n, vl) + 1023) << 52;  // 2^n
  vd scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return (1. + 2. * (p / (q - p))) * scale;
}

// The logit flow's pixel map of the flow's output y, as the graph maps it:
// floor((sigmoid(y) - alpha) / (1 - 2 alpha) * levels) clamped to the levels.
int64_t pixel_level(const MAFWeights& w, double y) {
  const double unit = (1. / (1. + std::exp(-y)) - w.alpha) / (1. - 2. * w.alpha);
  return static_cast<int64_t>(std::clamp(std::floor(unit * static_cast<double>(w.levels)), 0.,
                                         static_cast<double>(w.levels - 1)));
}

// Pixel `t` of its row for slots s0..s0+m-1 (m <= 8, lane s for slot s0 + s), their hidden states (K, H) advanced
// in place, their levels into `chosen`. As the graph: b = b exp(bound tanh(raw / bound)) + mu down the layers,
// from the latent's entry; tanh(z) = 1 - 2 / (exp(2z) + 1), whose absolute error (under 5e-16) is what the
// exp after it sees.
void step_block(const MAFWeights& w, const int64_t* pos, const double* latent, double* state, int64_t s0, int64_t m,
                int64_t t, int64_t* chosen) {
  const int64_t K = w.layers, H = w.hidden, span = w.width;
  vd b = {}, mu = {}, raw = {};
  for (int64_t s = 0; s < m; ++s) b[s] = latent[(s0 + s) * w.dims + pos[s0 + s] + t];
  for (int64_t k = K - 1; k >= 0; --k) {  // down the stack: the top layer's input first
    for (int64_t s = 0; s < m; ++s) {
      const int64_t i = pos[s0 + s] + t, row = (i * K + k) * H;
      double shift, scale;
      relu_dots(state + ((s0 + s) * K + k) * H, w.shift_rows + row, w.scale_rows + row, H, shift, scale);
      mu[s] = shift + w.shift_bias[i * K + k];
      raw[s] = scale + w.scale_bias[i * K + k];
    }
    const vd z = raw / w.bound;
    b = b * expv(w.bound * (1. - 2. / (expv(2. * z) + 1.))) + mu;
    for (int64_t s = 0; s < m; ++s) {
      const double* column = w.columns + ((pos[s0 + s] + t) * K + k) * H;
      double* h = state + ((s0 + s) * K + k) * H;
      for (int64_t j = 0; j < H; ++j) h[j] += column[j] * b[s];
    }
  }
  for (int64_t s = 0; s < m; ++s) chosen[(s0 + s) * span + t] = pixel_level(w, b[s]);
}

// A row of pixels for every slot from its position (a row start), the hidden states in place.
void row_in_place(const MAFWeights& w, const Tensor& positions, const Tensor& u, Tensor& hidden, Tensor& pixel) {
  check_cpu(positions, at::kLong, 2, "positions");
  check_cpu(u, at::kDouble, 2, "u");
  check_cpu(hidden, at::kDouble, 3, "hidden");
  const int64_t n = positions.size(0), span = w.width;
  TORCH_CHECK(u.size(0) == n && u.size(1) == w.dims, "u: expected (", n, ", ", w.dims, "), got ", u.sizes());
  TORCH_CHECK(hidden.sizes() == at::IntArrayRef({n, w.layers, w.hidden}), "hidden: expected (", n, ", ", w.layers,
              ", ", w.hidden, "), got ", hidden.sizes());
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK(pos[s] >= 0 && pos[s] % span == 0 && pos[s] + span <= w.dims, "positions: slot ", s, " at ", pos[s],
                " does not start a row of the image's ", w.dims, " pixels");
  const double* latent = u.data_ptr<double>();
  double* state = hidden.data_ptr<double>();
  int64_t* chosen = pixel.data_ptr<int64_t>();
  const int64_t blocks = (n + kSlotBlock - 1) / kSlotBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t s0 = block * kSlotBlock;
      for (int64_t t = 0; t < span; ++t) step_block(w, pos, latent, state, s0, std::min(n - s0, kSlotBlock), t, chosen);
    }
  });
}

std::tuple<Tensor, Tensor> maf_step(const Tensor& positions, const Tensor& u, const Tensor& hidden,
                                    at::TensorList weights) {
  const MAFWeights w(weights);
  Tensor next_hidden = hidden.clone();
  Tensor pixel = at::empty({positions.size(0), w.width, 1}, positions.options());
  row_in_place(w, positions, u, next_hidden, pixel);
  return {pixel, next_hidden};
}

// `rows` whole rows in one call (rows.h), the images and positions advanced in place. A MAF's pixels
// follow from its latents alone: it takes no labels, and the noise and temperatures are not read.
void maf_rows(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
              const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights,
              int64_t rows) {
  TORCH_CHECK(!labels.has_value(), "labels: MAF is unconditional");
  TORCH_CHECK(states.size() == 2, "states: expected u, hidden");
  const MAFWeights w(weights);
  Tensor hidden = states[1];
  Tensor pixel = at::empty({positions.size(0), w.width, 1}, positions.options());
  for_rows(pixels, positions, noise, rows, [&](const Tensor&, bool) {
    row_in_place(w, positions, states[0], hidden, pixel);
    return pixel;
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("maf_step(Tensor positions, Tensor u, Tensor hidden, Tensor[] weights) -> (Tensor, Tensor)");
  m.def("maf_rows(Tensor(a!) pixels, Tensor(b!) positions, Tensor? labels, Tensor noise, Tensor temperature,"
        " Tensor(c!)[] states, Tensor[] weights, int rows) -> ()");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) {
  m.impl("maf_step", &maf_step);
  m.impl("maf_rows", &maf_rows);
}

}  // namespace genserve
