// Fused cached sampling for Gated PixelCNN (van den Oord et al. 2016) on the CPU.
//
// The same two-phase program as the exported step graphs (export/steps.py), on the same state
// tensors, so the engine can run either and a test can compare them call by call:
// - gated_refresh, at a row start: every layer's vertical stack for the whole row and its link
//   into the horizontal stack (a GEMM over (slot, column) rows), empty left contexts;
// - gated_step: `span` pixels per slot, each through every layer's horizontal stack, the skip
//   and output layers and the inverse-CDF choice, with no dispatch between layers.
// The refresh runs in two parts. A later layer's vertical kernel reads p + 1 rows of the layer
// before's vertical outputs: p from its cache, written by earlier refreshes, and the row being
// started. The cache's part (for the shipped model two thirds of the refresh's arithmetic) needs
// nothing of the row above's pixels, so `prepare` computes it while that row's step still runs
// (gated_rows), on the cores a batch-1 step leaves idle; `finish_refresh` adds the rest once the
// row above is complete.
// A PixelVAE's decoder is this network conditioned on a map m(z) (n, Cc, H, W), a state written at
// admission: every layer adds 1x1 convolutions of m(z)'s row i to both stacks. The refresh adds
// them, so the step is the same with or without.
// Weights arrive packed by `genserve export` (export/fused.py), every dense layer as (in, out).
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

constexpr int64_t kBlock = 14;     // (slot, column) rows per finishing block: half a 28-pixel row, in L1/L2
constexpr int64_t kGrain = 14;     // fewest rows worth a thread in the finish (a batch-1 row splits in two)
constexpr int64_t kStepSlots = 8;  // slots per step task, taken layer by layer by one thread

// The packed weights, in the order export/fused.py writes them: 18, or 20 with the conditioning
// 1x1s (cond_w (L, 2, Cc, 2C) and cond_b (L, 2, 2C): the vertical stack's, then the horizontal one's).
struct GatedWeights {
  const float *v0_w, *v0_b, *v_w, *v_b, *link_w, *link_b, *h_b, *class_bias, *h0_w, *h_w, *hout_w, *hout_b,
      *skip_w, *skip_b, *oh_w, *oh_b, *lg_w, *lg_b, *cond_w = nullptr, *cond_b = nullptr;
  int64_t layers, channels, p0, p, classes, output_channels, levels, condition_channels = 0;

  explicit GatedWeights(at::TensorList w) {
    TORCH_CHECK(w.size() == 18 || w.size() == 20, "gated weights: expected 18 tensors (20 with conditioning), got ",
                w.size());
    for (const Tensor& t : w)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                  "gated weights must be contiguous float32 CPU tensors");
    const float** fields[] = {&v0_w, &v0_b, &v_w,    &v_b,    &link_w, &link_b, &h_b,  &class_bias, &h0_w,  &h_w,
                              &hout_w, &hout_b, &skip_w, &skip_b, &oh_w,   &oh_b,   &lg_w, &lg_b,       &cond_w, &cond_b};
    for (size_t i = 0; i < w.size(); ++i) *fields[i] = w[i].data_ptr<float>();
    layers = w[4].size(0);
    channels = w[10].size(1);
    p0 = w[8].size(0) - 1;
    p = w[9].size(1) / channels - 1;
    classes = w[7].dim() == 3 ? w[7].size(1) : 0;
    output_channels = w[14].size(1);
    levels = w[16].size(1);
    TORCH_CHECK(levels >= 2 && levels <= 256, "gated weights: 2..256 pixel levels, got ", levels);
    if (w.size() == 20) {
      condition_channels = w[18].size(2);
      TORCH_CHECK(w[18].dim() == 4 && w[18].size(0) == layers && w[18].size(1) == 2 && w[18].size(3) == 2 * channels &&
                      w[19].sizes() == at::IntArrayRef({layers, 2, 2 * channels}),
                  "gated weights: conditioning 1x1s of shapes ", w[18].sizes(), " and ", w[19].sizes(),
                  " do not match the network");
    }
  }
  float scale(int64_t level) const { return level_value(level, levels); }
};

// The conditioning map (n, Cc, H, W) of a conditioned network, or null for the others. The
// conditioning is the network's: a map is refused by an unconditioned one and needed by a conditioned one.
const float* condition_map(const GatedWeights& w, const std::optional<Tensor>& condition, int64_t n, int64_t height,
                           int64_t width) {
  if (!w.condition_channels) {
    TORCH_CHECK(!condition.has_value(), "condition: this network takes no conditioning map");
    return nullptr;
  }
  TORCH_CHECK(condition.has_value(), "condition: a conditioned network needs its conditioning map");
  check_cpu(*condition, at::kFloat, 4, "condition");
  TORCH_CHECK(condition->sizes() == at::IntArrayRef({n, w.condition_channels, height, width}), "condition: expected (",
              n, ", ", w.condition_channels, ", ", height, ", ", width, "), got ", condition->sizes());
  return condition->data_ptr<float>();
}

// The vertical caches: (n, L - 1, C, p, W), the rows i-p..i-1 of each later layer's input.
void check_vertical(const GatedWeights& w, const Tensor& vertical) {
  check_cpu(vertical, at::kFloat, 5, "vertical");
  TORCH_CHECK(vertical.size(1) == w.layers - 1 && vertical.size(2) == w.channels && vertical.size(3) == w.p,
              "vertical: shape ", vertical.sizes(), " does not match the weights");
}

// The cache's part of layer l's vertical pre-activations for every column j of slot s:
// prepared[l - 1, s * W + j] = the layer's bias + its kernel rows 0..p-1 over the cache (rows i-p..i-1
// of layer l-1's vertical outputs, zero outside the image).
void prepare_layer(const GatedWeights& w, const float* vertical, int64_t n, int64_t width, int64_t s, int64_t l,
                   float* prepared) {
  const int64_t C = w.channels, C2 = 2 * C, L = w.layers, p = w.p, k = 2 * p + 1, padded = width + 2 * p;
  // The cache (C, p, W) as p rows of `padded` columns, channels last, p zero columns either side:
  // a kernel row's window around column j is then the k * C floats from padded column j on.
  float* rows = thread_scratch(p * padded * C);
  const float* cache = vertical + (s * (L - 1) + l - 1) * C * p * width;
  for (int64_t rr = 0; rr < p; ++rr) {
    float* row = rows + rr * padded * C;
    std::fill_n(row, p * C, 0.f);
    std::fill_n(row + (width + p) * C, p * C, 0.f);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < width; ++j) row[(j + p) * C + c] = cache[(c * p + rr) * width + j];
  }
  const float* kernel = w.v_w + (l - 1) * (p + 1) * k * C * C2;  // (kernel row, tap, channel) rows of C2
  float* y = prepared + ((l - 1) * n + s) * width * C2;
  for (int64_t j = 0; j < width; ++j) std::copy_n(w.v_b + (l - 1) * C2, C2, y + j * C2);
  for (int64_t rr = 0; rr < p; ++rr)
    dense(rows + rr * padded * C, C, kernel + rr * k * C * C2, k * C, C2, nullptr, y, C2, width, true);
}

// The links into the horizontal stack, wherever they are: link (slot s, layer l, channel o, column j) at
// data + s * slot + l * layer + o * channel + j * column.
struct LinkView {
  const float* data;
  int64_t slot, layer, channel, column;
};

// The links state (n, L, 2C, W): what the exported graphs read.
LinkView state_links(const Tensor& links) {
  const int64_t L = links.size(1), C2 = links.size(2), width = links.size(3);
  return {links.data_ptr<float>(), L * C2 * width, C2 * width, width, 1};
}

// The links as the refresh computes them, (L, n * W, 2C): a pixel's 2C links of a layer lie together.
LinkView row_links(const Tensor& links, int64_t width) {
  const int64_t rows = links.size(1), C2 = links.size(2);
  return {links.data_ptr<float>(), width * C2, rows * C2, 1, C2};
}

// The links from the refresh's layout into the state's, for slot s.
void store_links(const Tensor& from, Tensor& to, int64_t s) {
  const int64_t L = to.size(1), C2 = to.size(2), width = to.size(3), rows = from.size(1);
  const float* src = from.data_ptr<float>() + s * width * C2;
  float* dst = to.data_ptr<float>() + s * L * C2 * width;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t o = 0; o < C2; ++o)
      for (int64_t j = 0; j < width; ++j) dst[(l * C2 + o) * width + j] = src[(l * rows + j) * C2 + o];
}

// What a step call reads and writes, checked once (step_call) and shared by its tasks.
struct StepCall {
  const int64_t* pos;
  const float *eps, *temp, *hidden_in;
  LinkView links;
  float *context, *hidden_state, *logits_record;
  int64_t* chosen;
  const int64_t* forced;  // the teacher's pixels, or null
  int64_t n, span, width;
};

// The step's outputs: `image_out` holds the image context on entry and is advanced in place;
// `hidden_out` may be `hidden_context` itself (each slot's task reads its part before writing it).
StepCall step_call(const GatedWeights& w, const Tensor& positions, const Tensor& noise, const Tensor& temperature,
                   const Tensor& links, Tensor& image_out, const Tensor& hidden_context, Tensor& hidden_out,
                   const std::optional<Tensor>& teacher, Tensor& pixel, Tensor& logits_out) {
  const Tensor& image_context = image_out;
  check_cpu(positions, at::kLong, 2, "positions");
  check_cpu(noise, at::kFloat, 3, "noise");
  check_cpu(temperature, at::kFloat, 2, "temperature");
  check_cpu(links, at::kFloat, 4, "links");
  check_cpu(image_context, at::kFloat, 2, "image_context");
  check_cpu(hidden_context, at::kFloat, 3, "hidden_context");
  const int64_t n = positions.size(0), span = noise.size(1), C2 = 2 * w.channels, L = w.layers;
  TORCH_CHECK(noise.size(2) == 1, "noise: single-channel images only");
  TORCH_CHECK(links.size(1) == L && links.size(2) == C2, "links: shape ", links.sizes(), " does not match the weights");
  TORCH_CHECK(image_context.size(1) == w.p0 + 1 && hidden_context.size(1) == L - 1 &&
                  hidden_context.size(2) == w.p * w.channels,
              "contexts: shapes ", image_context.sizes(), " and ", hidden_context.sizes(), " do not match the weights");
  const int64_t* forced = nullptr;
  if (teacher.has_value()) {
    check_cpu(*teacher, at::kLong, 3, "teacher");
    forced = teacher->data_ptr<int64_t>();
  }
  TORCH_CHECK(pixel.sizes() == at::IntArrayRef({n, span, 1}) && hidden_out.sizes() == hidden_context.sizes() &&
                  hidden_out.is_contiguous() && logits_out.numel() == (forced ? n * span * w.levels : 0),
              "pixel, hidden_context, logits: outputs of the wrong shape");
  return {positions.data_ptr<int64_t>(), noise.data_ptr<float>(), temperature.data_ptr<float>(),
          hidden_context.data_ptr<float>(), state_links(links), image_out.data_ptr<float>(),
          hidden_out.data_ptr<float>(), logits_out.data_ptr<float>(), pixel.data_ptr<int64_t>(), forced, n, span,
          links.size(3)};
}

// `span` pixels of slots b0..b1-1, each through every layer with nothing dispatched between them.
void step_slots(const GatedWeights& w, const StepCall& call, int64_t b0, int64_t b1) {
  const int64_t C = w.channels, C2 = 2 * C, L = w.layers, p0 = w.p0, p = w.p, O = w.output_channels;
  const int64_t levels = w.levels, hidden = (p + 1) * C, span = call.span, width = call.width, m = b1 - b0;
  const int64_t* pos = call.pos;
  const std::array<float*, 7> buffers = scratch_arrays<7>(
      {(L - 1) * m * hidden, m * C2, m * L * C, m * C, m * C, m * O, m * levels});
  float *windows = buffers[0], *pre = buffers[1], *gated = buffers[2], *h_out = buffers[3], *skips = buffers[4],
        *out_hidden = buffers[5], *logits = buffers[6];
  for (int64_t l = 0; l < L - 1; ++l)  // layer l+1's window: layer l's last p outputs, then its current one
    for (int64_t s = 0; s < m; ++s)
      std::memcpy(windows + (l * m + s) * hidden, call.hidden_in + ((b0 + s) * (L - 1) + l) * p * C,
                  p * C * sizeof(float));
  float* ctx = call.context + b0 * (p0 + 1);
  const LinkView& links = call.links;
  auto gather_links = [&](int64_t l, int64_t offset) {  // the link of column j of layer l, per slot
    for (int64_t s = 0; s < m; ++s) {
      const int64_t j = pos[b0 + s] % width + offset;
      const float* src = links.data + (b0 + s) * links.slot + l * links.layer + j * links.column;
      if (links.channel == 1) std::copy_n(src, C2, pre + s * C2);
      else
        for (int64_t o = 0; o < C2; ++o) pre[s * C2 + o] = src[o * links.channel];
    }
  };
  for (int64_t t = 0; t < span; ++t) {
    gather_links(0, t);
    dense(ctx, p0 + 1, w.h0_w, p0 + 1, C2, nullptr, pre, C2, m, true);
    gate_rows(pre, C2, gated, L * C, C, m);
    dense(gated, L * C, w.hout_w, C, C, w.hout_b, h_out, C, m);
    for (int64_t l = 1; l < L; ++l) {
      float* win = windows + (l - 1) * m * hidden;
      for (int64_t s = 0; s < m; ++s) std::memcpy(win + s * hidden + p * C, h_out + s * C, C * sizeof(float));
      gather_links(l, t);
      dense(win, hidden, w.h_w + (l - 1) * hidden * C2, hidden, C2, nullptr, pre, C2, m, true);
      for (int64_t s = 0; s < m; ++s)  // drop the oldest column
        std::memmove(win + s * hidden, win + s * hidden + C, p * C * sizeof(float));
      gate_rows(pre, C2, gated + l * C, L * C, C, m);
      if (l < L - 1)  // residual: h_out += horizontal_out(gated); the last layer's feeds nothing
        dense(gated + l * C, L * C, w.hout_w + l * C * C, C, C, w.hout_b + l * C, h_out, C, m, true);
    }
    dense(gated, L * C, w.skip_w, L * C, C, w.skip_b, skips, C, m);
    relu_rows(skips, C, C, m);
    dense(skips, C, w.oh_w, C, O, w.oh_b, out_hidden, O, m);
    relu_rows(out_hidden, O, O, m);
    dense(out_hidden, O, w.lg_w, O, levels, w.lg_b, logits, levels, m);
    for (int64_t s = 0; s < m; ++s) {
      const int64_t slot = b0 + s;
      const int64_t value = call.chosen[slot * span + t] = pick_level(
          logits + s * levels, levels, slot * span + t, call.forced, call.eps, call.temp[slot],
          call.logits_record);
      float* c = ctx + s * (p0 + 1);
      std::memmove(c, c + 1, p0 * sizeof(float));
      c[p0] = w.scale(value);
    }
  }
  for (int64_t l = 0; l < L - 1; ++l)
    for (int64_t s = 0; s < m; ++s)
      std::memcpy(call.hidden_state + ((b0 + s) * (L - 1) + l) * p * C, windows + (l * m + s) * hidden,
                  p * C * sizeof(float));
}

// Independent work of a call over n slots, each part optional: the step's slots (tasks of
// kStepSlots), the links from the refresh's layout into the state's (a task per slot) and the cache's
// part of the next refresh over `vertical` (a task per later layer and slot). Handed to the intra-op
// threads as each comes free: a batch-1 step is one serial chain through the layers, and meanwhile
// the other cores store the links and prepare the next row.
struct RowTasks {
  const StepCall* step = nullptr;
  const Tensor* refreshed_links = nullptr;  // (L, n * W, 2C), into...
  Tensor* links = nullptr;                  // ...the state (n, L, 2C, W)
  const float* vertical = nullptr;
  float* prepared = nullptr;
  int64_t n = 0, width = 0;
};

void run_tasks(const GatedWeights& w, const RowTasks& work) {
  const int64_t n = work.n, step_tasks = work.step ? (work.step->n + kStepSlots - 1) / kStepSlots : 0;
  const int64_t link_tasks = work.links ? n : 0;
  const int64_t tasks = step_tasks + link_tasks + (work.prepared ? (w.layers - 1) * n : 0);
  auto run = [&](int64_t task) {
    if (task < step_tasks)
      return step_slots(w, *work.step, task * kStepSlots, std::min(work.step->n, (task + 1) * kStepSlots));
    if (task < step_tasks + link_tasks) return store_links(*work.refreshed_links, *work.links, task - step_tasks);
    // Layer by layer: a thread's next task mostly uses the same weights.
    const int64_t layer_slot = task - step_tasks - link_tasks;
    prepare_layer(w, work.vertical, n, work.width, layer_slot % n, 1 + layer_slot / n, work.prepared);
  };
  const int threads = at::in_parallel_region() ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), tasks));
  if (threads <= 1) {
    for (int64_t task = 0; task < tasks; ++task) run(task);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) run(task);
}

// The cache's part of the refresh over `vertical` (see prepare_layer): (L - 1, n * W, 2C).
Tensor prepare(const GatedWeights& w, const Tensor& vertical) {
  check_vertical(w, vertical);
  const int64_t n = vertical.size(0), width = vertical.size(4);
  Tensor prepared = at::empty({w.layers - 1, n * width, 2 * w.channels}, vertical.options());
  RowTasks work;
  work.vertical = vertical.data_ptr<float>();
  work.prepared = prepared.data_ptr<float>();
  work.n = n;
  work.width = width;
  run_tasks(w, work);
  return prepared;
}

// The rest of the refresh once the row above is complete, `prepared` holding the cache's part
// (prepare): the first layer over the image, each later layer's last kernel row over the new row's
// outputs of the layer before, the links, the gates and the caches' shift. `vertical_out` may be
// `vertical` itself; `prepared` is used up. The links go to `refreshed_links` (L, n * W, 2C), whole,
// and with `store` into the state `links` too (else the caller does: store_links).
void finish_refresh(const GatedWeights& w, const Tensor& pixels, const Tensor& positions,
                    const std::optional<Tensor>& labels, const Tensor& vertical,
                    const std::optional<Tensor>& condition, Tensor& vertical_out, Tensor& links,
                    const Tensor& prepared, Tensor& refreshed_links, bool store) {
  check_cpu(pixels, at::kByte, 4, "pixels");
  check_cpu(positions, at::kLong, 2, "positions");
  check_vertical(w, vertical);
  const int64_t n = pixels.size(0), height = pixels.size(2), width = pixels.size(3);
  const int64_t C = w.channels, C2 = 2 * C, L = w.layers, p0 = w.p0, p = w.p, k0 = 2 * p0 + 1, k = 2 * p + 1;
  TORCH_CHECK(pixels.size(1) == 1, "pixels: single-channel images only");
  TORCH_CHECK(vertical.size(0) == n && vertical.size(4) == width, "vertical: shape ", vertical.sizes(),
              " does not match pixels of shape ", pixels.sizes());
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
  TORCH_CHECK(prepared.sizes() == at::IntArrayRef({L - 1, n * width, C2}) &&
                  refreshed_links.sizes() == at::IntArrayRef({L, n * width, C2}),
              "prepared, refreshed links: wrong shapes");
  const float* cond = condition_map(w, condition, n, height, width);
  if (n == 0) return;

  const uint8_t* pix = pixels.data_ptr<uint8_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* vin = vertical.data_ptr<float>();
  float* vout_state = vertical_out.data_ptr<float>();
  float* later = prepared.data_ptr<float>();
  float* const link = refreshed_links.data_ptr<float>();

  const int64_t rows = n * width, in0 = (p0 + 1) * k0, padded = width + 2 * p, Cc = w.condition_channels;
  // Layer l's gated outputs go to current(l): per slot `padded` columns, channels last, p zero
  // columns either side, so layer l+1's last kernel row reads its window in place. Two alternate:
  // while layer l+1 is computed from layer l's outputs, the cache shift reads them too.
  float* const col = thread_scratch(rows * (in0 + C2 + Cc) + 2 * n * padded * C);
  float* const first = col + rows * in0;
  float* const current_rows = first + rows * C2;
  float* const condition_rows = current_rows + 2 * n * padded * C;  // m(z) at row i, (slot, column) rows of Cc
  auto current = [&](int64_t l) { return current_rows + l % 2 * n * padded * C; };
  for (int64_t s = 0; s < 2 * n; ++s) {
    std::fill_n(current_rows + s * padded * C, p * C, 0.f);
    std::fill_n(current_rows + (s * padded + width + p) * C, p * C, 0.f);
  }

  // Layer l's cache (rows i-p..i-1 of layer l-1's outputs) moves up one row, layer l-1's outputs at
  // row i entering last: a (slot, channel) per iteration, shared among the threads of the
  // enclosing region, which go on without waiting.
  auto shift_cache = [&](int64_t l) {
#pragma omp for schedule(static) nowait
    for (int64_t sc = 0; sc < n * C; ++sc) {
      const int64_t s = sc / C, c = sc % C;
      const float* cache = vin + ((s * (L - 1) + l - 1) * C + c) * p * width;  // (p, W)
      float* next = vout_state + ((s * (L - 1) + l - 1) * C + c) * p * width;
      for (int64_t r = 0; r + 1 < p; ++r) std::memmove(next + r * width, cache + (r + 1) * width, width * sizeof(float));
      const float* newest = current(l - 1) + (s * padded + p) * C + c;
      for (int64_t j = 0; j < width; ++j) next[(p - 1) * width + j] = newest[j * C];
    }
  };
  // f(s, ja, jb, r) for each slot's run of columns ja..jb-1 among rows r0..r1-1, r its first row.
  auto slot_runs = [width](int64_t r0, int64_t r1, auto f) {
    for (int64_t r = r0; r < r1;) {
      const int64_t s = r / width, ja = r % width, jb = std::min(width, ja + (r1 - r));
      f(s, ja, jb, r);
      r += jb - ja;
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
    for (int64_t l = 0; l < L; ++l) {
      if (l >= 1) shift_cache(l);  // layer l-1's outputs are complete: the barrier below
      const float* last_row = l ? w.v_w + ((l - 1) * (p + 1) + p) * k * C * C2 : nullptr;  // its kernel row over row i
#pragma omp for schedule(static) nowait
      for (int64_t block = 0; block < blocks; ++block) {  // blocks small enough to stay in cache
        const int64_t r0 = block * kBlock, r1 = std::min(rows, r0 + kBlock), m = r1 - r0;
        float* v = l == 0 ? first + r0 * C2 : later + ((l - 1) * rows + r0) * C2;
        if (l == 0) {
          for (int64_t r = r0; r < r1; ++r) {  // im2col: image rows i-1-p0..i-1 around column j
            const int64_t s = r / width, j = r % width, i = pos[s] / width;
            float* dst = col + r * in0;
            for (int64_t rr = 0; rr <= p0; ++rr)
              for (int64_t cc = 0; cc < k0; ++cc) {
                const int64_t ii = i - 1 - p0 + rr, jj = j - p0 + cc;
                dst[rr * k0 + cc] =
                    ii >= 0 && jj >= 0 && jj < width ? w.scale(pix[(s * height + ii) * width + jj]) : 0.f;
              }
            for (int64_t c = 0; c < Cc; ++c)  // read by every layer, after this one's barrier
              condition_rows[r * Cc + c] = cond[((s * Cc + c) * height + i) * width + j];
          }
          dense(col + r0 * in0, in0, w.v0_w, in0, C2, w.v0_b, v, C2, m);
          for (int64_t r = r0; r < r1; ++r)  // shift down: row 0 sees nothing above
            if (pos[r / width] < width) std::fill_n(v + (r - r0) * C2, C2, 0.f);
        } else {
          slot_runs(r0, r1, [&](int64_t s, int64_t ja, int64_t jb, int64_t r) {
            dense(current(l - 1) + (s * padded + ja) * C, C, last_row, k * C, C2, nullptr, v + (r - r0) * C2, C2,
                  jb - ja, true);
          });
        }
        float* h = link + (l * rows + r0) * C2;
        const float* hb = w.h_b + l * C2;
        for (int64_t r = r0; r < r1; ++r) {
          const bool horizontal_bias = l > 0 || r % width > 0;  // the first layer's shift right: column 0 has no bias
          for (int64_t o = 0; o < C2; ++o) h[(r - r0) * C2 + o] = horizontal_bias ? hb[o] : 0.f;
        }
        dense(v, C2, w.link_w + l * C2 * C2, C2, C2, w.link_b + l * C2, h, C2, m, true);
        if (label)  // the class biases: the vertical gate's after the link, the horizontal one's in it
          for (int64_t r = r0; r < r1; ++r) {
            const float* cb = w.class_bias + (l * w.classes + label[r / width]) * 2 * C2;
            for (int64_t o = 0; o < C2; ++o) v[(r - r0) * C2 + o] += cb[o], h[(r - r0) * C2 + o] += cb[C2 + o];
          }
        if (cond) {  // the conditioning map's 1x1s, added as the class biases are
          const float* cw = w.cond_w + l * 2 * Cc * C2;
          dense(condition_rows + r0 * Cc, Cc, cw, Cc, C2, w.cond_b + l * 2 * C2, v, C2, m, true);
          dense(condition_rows + r0 * Cc, Cc, cw + Cc * C2, Cc, C2, w.cond_b + (l * 2 + 1) * C2, h, C2, m, true);
        }
        if (l < L - 1)
          slot_runs(r0, r1, [&](int64_t s, int64_t ja, int64_t jb, int64_t r) {
            gate_rows(v + (r - r0) * C2, C2, current(l) + (s * padded + p + ja) * C, C, C, jb - ja);
          });
      }
#pragma omp barrier
    }
    if (store) {
#pragma omp for schedule(static)
      for (int64_t s = 0; s < n; ++s) store_links(refreshed_links, links, s);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_refresh(const Tensor& pixels, const Tensor& positions,
                                                         const std::optional<Tensor>& labels, const Tensor& vertical,
                                                         const std::optional<Tensor>& condition,
                                                         at::TensorList weights) {
  const GatedWeights w(weights);
  const Tensor prepared = prepare(w, vertical);
  const int64_t n = vertical.size(0), width = vertical.size(4), L = w.layers, C = w.channels;
  Tensor vertical_out = at::empty_like(vertical);
  Tensor links = at::empty({n, L, 2 * C, width}, vertical.options());
  Tensor refreshed_links = at::empty({L, n * width, 2 * C}, vertical.options());
  finish_refresh(w, pixels, positions, labels, vertical, condition, vertical_out, links, prepared, refreshed_links,
                 true);
  return {vertical_out, links, at::zeros({n, w.p0 + 1}, vertical.options()),
          at::zeros({n, L - 1, w.p * C}, vertical.options())};
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
  const StepCall call = step_call(w, positions, noise, temperature, links, image_out, hidden_context, hidden_out,
                                  teacher, pixel, logits_out);
  RowTasks work;
  work.step = &call;
  run_tasks(w, work);
  return {pixel, image_out, hidden_out, logits_out};
}

// What in-place row calls keep beside the states: the next refresh's cache part (prepare) and the
// links in the refresh's layout, where the step reads them.
struct RowBuffers {
  Tensor prepared, refreshed_links;

  RowBuffers(const GatedWeights& w, const Tensor& vertical)
      : prepared(prepare(w, vertical)),
        refreshed_links(
            at::empty({w.layers, vertical.size(0) * vertical.size(4), 2 * w.channels}, vertical.options())) {}
};

// A whole row for slots that all start one: the refresh and the step, the states (vertical, links,
// image_context, hidden_context [, condition, read only]) updated in place. `buffers.prepared` holds the row's cache part on
// entry and, with `prepare_next`, the next row's on return. Returns the pixels.
Tensor row_in_place(const GatedWeights& w, const Tensor& pixels, const Tensor& positions,
                    const std::optional<Tensor>& labels, const Tensor& noise, const Tensor& temperature,
                    at::TensorList states, RowBuffers& buffers, bool prepare_next) {
  Tensor vertical = states[0], links = states[1], image_context = states[2], hidden_context = states[3];
  const std::optional<Tensor> condition = states.size() > 4 ? std::optional<Tensor>(states[4]) : std::nullopt;
  finish_refresh(w, pixels, positions, labels, vertical, condition, vertical, links, buffers.prepared,
                 buffers.refreshed_links, false);
  image_context.zero_();
  hidden_context.zero_();
  Tensor pixel = at::empty({positions.size(0), noise.size(1), 1}, positions.options());
  Tensor no_logits = at::empty({0}, links.options());
  StepCall call = step_call(w, positions, noise, temperature, links, image_context, hidden_context, hidden_context,
                            std::nullopt, pixel, no_logits);
  const int64_t width = vertical.size(4);
  call.links = row_links(buffers.refreshed_links, width);
  RowTasks work;
  work.step = &call;
  work.refreshed_links = &buffers.refreshed_links;
  work.links = &links;
  if (prepare_next) {
    work.vertical = vertical.data_ptr<float>();
    work.prepared = buffers.prepared.data_ptr<float>();
  }
  work.n = vertical.size(0);
  work.width = width;
  run_tasks(w, work);
  return pixel;
}

void check_states(const GatedWeights& w, at::TensorList states) {
  TORCH_CHECK(states.size() == (w.condition_channels ? 5 : 4),
              "states: expected vertical, links, image_context, hidden_context",
              w.condition_channels ? ", condition" : "", "; got ", states.size(), " tensors");
}

Tensor gated_row(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                 const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights) {
  const GatedWeights w(weights);
  check_states(w, states);
  RowBuffers buffers(w, states[0]);
  return row_in_place(w, pixels, positions, labels, noise, temperature, states, buffers, false);
}

// `rows` whole rows in one call (rows.h): the images and positions advanced in place, each row's
// cache part prepared during the step of the row before.
void gated_rows(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights,
                int64_t rows) {
  const GatedWeights w(weights);
  check_states(w, states);
  std::optional<RowBuffers> buffers;
  if (rows > 0) buffers.emplace(w, states[0]);
  for_rows(pixels, positions, noise, rows, [&](const Tensor& step_noise, bool another_follows) {
    return row_in_place(w, pixels, positions, labels, step_noise, temperature, states, *buffers, another_follows);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("gated_refresh(Tensor pixels, Tensor positions, Tensor? labels, Tensor vertical, Tensor? condition,"
        " Tensor[] weights) -> (Tensor, Tensor, Tensor, Tensor)");
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
