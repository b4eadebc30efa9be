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

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "kernels.h"
#include "rows.h"

namespace genserve {
namespace {

using at::Tensor;

constexpr int64_t kStepSlots = 8;  // slots per step task, taken pixel by pixel by one thread

struct PixelCNNWeights {
  const float *in_w, *in_b, *reduce_w, *reduce_b, *masked_w, *masked_b, *expand_w, *expand_b, *oh_w, *oh_b, *lg_w,
      *lg_b;
  int64_t blocks, hidden, window, output_channels, levels;

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
    window = w[4].dim() == 3 ? w[4].size(1) : 0;
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
inline void gather_window(const float* rows, int64_t channels, int64_t R, int64_t padded, int64_t j, int64_t k,
                          float* dst) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t r = 0; r < R; ++r) std::memcpy(dst + (c * R + r) * k, rows + (c * R + r) * padded + j, k * sizeof(float));
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

// The residual blocks' masked kernels (packed over (channel, row, column) windows of R = p + 1 rows
// and k = 2p + 1 columns) split by what they see: the p rows above, which stay fixed while a row is
// stepped, and the centre row up to the pixel (the mask zeroes its columns right of the centre).
// A call applies the rows-above part to all its columns in one GEMM first; per pixel only the
// centre part is left: for 3x3 kernels a third of the kernel's weights, each read from L2 at every pixel.
struct MaskedSplit {
  int64_t R, p, k, above_in, centre_in;
  std::vector<float> above_w;   // (blocks, above_in, h): windows in (row, column, channel) order
  std::vector<float> centre_w;  // (blocks, centre_in, h): (column, channel) over columns j-p..j

  MaskedSplit(const PixelCNNWeights& w, int64_t rows)
      : R(rows), p(rows - 1), k(2 * rows - 1), above_in(p * w.hidden * k), centre_in(w.hidden * rows),
        above_w(w.blocks * above_in * w.hidden), centre_w(w.blocks * centre_in * w.hidden) {
    const int64_t h = w.hidden;
    TORCH_CHECK(!w.blocks || w.window == h * R * k, "block rows: ", R, " rows do not match the masked kernels' ",
                w.window, " taps");
    for (int64_t b = 0; b < w.blocks; ++b)
      for (int64_t c = 0; c < h; ++c)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t kk = 0; kk < k; ++kk) {
            const float* from = w.masked_w + (b * w.window + (c * R + r) * k + kk) * h;
            float* to = r < p ? above_w.data() + (b * above_in + (r * k + kk) * h + c) * h
                              : kk <= p ? centre_w.data() + (b * centre_in + kk * h + c) * h : nullptr;
            if (to) std::copy_n(from, h, to);
            else
              TORCH_CHECK(std::all_of(from, from + h, [](float v) { return v == 0.f; }),
                          "masked_w: the centre row's taps right of the centre must be masked (zero)");
          }
  }
};

// A step on a group of at most kStepSlots slots on one thread: the call's sizes, the packed weights and
// the thread's buffers. A row is stepped in two parts: each block's masked layer's bias and rows-above
// part at the pixels stepped (`above_part`), then the chain pixel by pixel (`pixel`). Where the group's
// rows live is the caller's: a step call keeps them in the caches, a multi-row call in rows of its own.
struct GroupStep {
  const PixelCNNWeights& w;
  const MaskedSplit& split;
  const int64_t m, span, h, h2, R0, p0, k0, padded0, in0, p, padded;
  float *x, *act, *reduced, *win, *masked, *out_hidden, *logits;
  float *rows_above, *centre;  // for rows from the caches (`own_rows`): p rows, and every (block, slot)'s centre row

  // The buffers in `base` (buffer_counts' arrays), or where it is null in the calling thread's scratch.
  GroupStep(const PixelCNNWeights& w, const MaskedSplit& split, int64_t m, int64_t span, int64_t width, int64_t R0,
            bool own_rows, float* base = nullptr)
      : w(w), split(split), m(m), span(span), h(w.hidden), h2(2 * w.hidden), R0(R0), p0(R0 - 1), k0(2 * R0 - 1),
        padded0(width + 2 * (R0 - 1)), in0(R0 * (2 * R0 - 1)), p(split.p), padded(width + 2 * split.p) {
    const std::array<int64_t, 8> counts = buffer_counts(w, split, m, span, width, R0, own_rows);
    const std::array<float*, 8> buffers = base ? carve_arrays(counts, base) : scratch_arrays(counts);
    x = buffers[0], act = buffers[1], reduced = buffers[2], win = buffers[3], masked = buffers[4];
    out_hidden = buffers[5], logits = out_hidden + m * w.output_channels, rows_above = buffers[6], centre = buffers[7];
  }

  // The floats of each of a step's buffers, in the order of the fields above.
  static std::array<int64_t, 8> buffer_counts(const PixelCNNWeights& w, const MaskedSplit& split, int64_t m,
                                              int64_t span, int64_t width, int64_t R0, bool own_rows) {
    const int64_t h = w.hidden, in0 = R0 * (2 * R0 - 1), padded = width + 2 * split.p;
    return {m * 2 * h, m * 2 * h, m * h, m * std::max(in0, split.centre_in), w.blocks * m * span * h,
            m * (w.output_channels + w.levels), own_rows ? split.p * padded * h : 0,
            own_rows ? w.blocks * m * padded * h : 0};
  }

  // Each block's masked layer's bias and rows-above part at pixels first..last of the span, (block, slot,
  // pixel) rows of `masked`, slot s's span from column column[s]; above(b, s, r) is block b's r-th row above
  // for slot s, channels last. The whole span's sums whatever the parts (dense_part).
  template <class Above>
  void above_part(int64_t first, int64_t last, const int64_t* column, Above above) {
    for (int64_t b = 0; b < w.blocks; ++b)
      for (int64_t s = 0; s < m; ++s) {
        float* y = masked + (b * m + s) * span * h;
        for (int64_t t = first; t < last; ++t) std::copy_n(w.masked_b + b * h, h, y + t * h);
        for (int64_t r = 0; r < p; ++r)
          dense_part(above(b, s, r) + column[s] * h, h, split.above_w.data() + (b * split.above_in + r * split.k * h) * h,
                     split.k * h, h, nullptr, y, h, span, first, last, true);
      }
  }

  // Pixel t of the span, slot s at column column[s] (`same_column`: every slot at the same one), through
  // the input layer, every residual block and the output layers; choose(s, logits) gives slot s's level,
  // which goes into its image. image + s * image_slot: slot s's R0 image rows, padded0 apart; `centre`:
  // every (block, slot)'s centre row, channels last, into which each block's input at the pixel goes.
  template <class Choose>
  void pixel(int64_t t, const int64_t* column, bool same_column, float* image, int64_t image_slot, float* centre,
             Choose choose) {
    const int64_t centre_in = split.centre_in, O = w.output_channels;
    for (int64_t s = 0; s < m; ++s) gather_window(image + s * image_slot, 1, R0, padded0, column[s], k0, win + s * in0);
    dense(win, in0, w.in_w, in0, h2, w.in_b, x, h2, m);
    for (int64_t b = 0; b < w.blocks; ++b) {
      for (int64_t i = 0; i < m * h2; ++i) act[i] = x[i] > 0.f ? x[i] : 0.f;
      dense(act, h2, w.reduce_w + b * h2 * h, h2, h, w.reduce_b + b * h, reduced, h, m);
      relu_rows(reduced, h, h, m);
      float* centre_rows = centre + b * m * padded * h;
      for (int64_t s = 0; s < m; ++s) {  // the block's input at this pixel joins its row, then its window
        std::copy_n(reduced + s * h, h, centre_rows + (s * padded + column[s] + p) * h);
        if (!same_column) std::copy_n(centre_rows + (s * padded + column[s]) * h, centre_in, win + s * centre_in);
      }
      const float* window = same_column ? centre_rows + column[0] * h : win;
      float* y = masked + (b * m * span + t) * h;  // this pixel's row of every slot, span * h apart
      dense(window, same_column ? padded * h : centre_in, split.centre_w.data() + b * centre_in * h, centre_in, h,
            nullptr, y, span * h, m, true);
      relu_rows(y, span * h, h, m);
      dense(y, span * h, w.expand_w + b * h * h2, h, h2, w.expand_b + b * h2, x, h2, m, true);
    }
    relu_rows(x, h2, h2, m);
    dense(x, h2, w.oh_w, h2, O, w.oh_b, out_hidden, O, m);
    relu_rows(out_hidden, O, O, m);
    dense(out_hidden, O, w.lg_w, O, w.levels, w.lg_b, logits, w.levels, m);
    for (int64_t s = 0; s < m; ++s)
      image[s * image_slot + p0 * padded0 + column[s] + p0] = w.scale(choose(s, logits + s * w.levels));
  }
};

// The checks of the caches that a step reads and writes in place: image_rows (n, 1, p0 + 1, W + 2p0),
// each block's rows (n, h, p + 1, W + 2p), contiguous float32.
void check_caches(const PixelCNNWeights& w, const MaskedSplit& split, const Tensor& image_rows,
                  at::TensorList block_rows) {
  TORCH_CHECK(image_rows.scalar_type() == at::kFloat && image_rows.dim() == 4 && image_rows.size(1) == 1 &&
                  image_rows.size(2) >= 1 && image_rows.is_contiguous(),
              "image_rows: expected (n, 1, p0+1, W+2p0) float32");
  TORCH_CHECK(static_cast<int64_t>(block_rows.size()) == w.blocks, "block_rows: ", block_rows.size(),
              " caches for ", w.blocks, " blocks");
  const int64_t width = image_rows.size(3) - 2 * (image_rows.size(2) - 1);
  for (const Tensor& rows : block_rows)
    TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 4 && rows.size(0) == image_rows.size(0) &&
                    rows.size(1) == w.hidden && rows.size(2) == split.R && rows.size(3) == width + 2 * split.p &&
                    rows.is_contiguous(),
                "block rows: shape ", rows.sizes(), " does not match the weights");
}

void check_temperature(const Tensor& temperature, int64_t n) {
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && temperature.is_contiguous() && temperature.numel() == n,
              "temperature: expected (n, 1) float32 for n = ", n, ", got ", temperature.sizes(), " ",
              temperature.scalar_type());
}

// The step on caches updated in place (contiguous float32): pixels into `pixel`, logits (teacher only).
void step_into(const PixelCNNWeights& w, const Tensor& positions, const Tensor& noise, const Tensor& temperature,
               Tensor& image_rows, at::TensorList block_rows, const std::optional<Tensor>& teacher, Tensor& pixel,
               Tensor& logits_out, const MaskedSplit& split) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.is_contiguous(),
              "positions: expected (n, 1) int64");
  TORCH_CHECK(noise.scalar_type() == at::kFloat && noise.dim() == 3 && noise.size(2) == 1 && noise.is_contiguous(),
              "noise: expected (n, span, 1) float32 (single-channel images only)");
  const int64_t n = positions.size(0), span = noise.size(1), h = w.hidden, levels = w.levels;
  check_temperature(temperature, n);
  check_caches(w, split, image_rows, block_rows);
  const int64_t R0 = image_rows.size(2), p0 = R0 - 1, padded0 = image_rows.size(3), width = padded0 - 2 * p0;
  const int64_t R = split.R, p = split.p, padded = width + 2 * p;
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
  TORCH_CHECK(span <= width, "noise: ", span, " pixels per call, more than a row of ", width);
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK(pos[s] >= 0 && pos[s] % width + span <= width, "positions: slot ", s, " at ", pos[s],
                " has fewer than ", span, " pixels left in its row");

  auto step_slots = [&](int64_t b0, int64_t b1) {
    const int64_t m = b1 - b0;
    GroupStep group(w, split, m, span, width, R0, true);
    int64_t first[kStepSlots], column[kStepSlots];
    bool same_column = true;  // every slot at the same column: the windows read in place, no copy
    for (int64_t s = 0; s < m; ++s) {
      first[s] = pos[b0 + s] % width;
      same_column = same_column && first[s] == first[0];
    }
    auto cache = [&](int64_t b, int64_t s) { return caches[b] + (b0 + s) * h * R * padded; };
    group.above_part(0, span, first, [&](int64_t b, int64_t s, int64_t r) {
      float* row = group.rows_above + r * padded * h;
      transpose(cache(b, s) + r * padded, R * padded, row, h, h, padded);
      return row;
    });
    // Each block's centre row is kept channels last for the call, so that a pixel's window is h * R
    // consecutive floats, and goes into the channels-first cache once, at the call's end (there a
    // pixel's h channels lie on h different cache lines). Of it only the columns left of the slot's first
    // pixel are read in: a pixel's window reads its own column and those left of it, and each pixel's
    // column is written before it is read.
    for (int64_t b = 0; b < w.blocks; ++b)
      for (int64_t s = 0; s < m; ++s)
        transpose(cache(b, s) + p * padded, R * padded, group.centre + (b * m + s) * padded * h, h, h, p + first[s]);
    for (int64_t t = 0; t < span; ++t) {
      for (int64_t s = 0; s < m; ++s) column[s] = first[s] + t;
      group.pixel(t, column, same_column, image + b0 * R0 * padded0, R0 * padded0, group.centre,
                  [&](int64_t s, const float* logits) {
                    const int64_t index = (b0 + s) * span + t;
                    return chosen[index] = pick_level(logits, levels, index, forced, eps, temp[b0 + s], logits_record);
                  });
    }
    for (int64_t b = 0; b < w.blocks; ++b)  // the stepped columns of each centre row back into its cache
      for (int64_t s = 0; s < m; ++s)
        transpose(group.centre + ((b * m + s) * padded + p + first[s]) * h, h, cache(b, s) + p * padded + p + first[s],
                  R * padded, span, h);
  };
  // Slots in blocks of kStepSlots, a block per task, as in the Gated step: a task's buffers stay small
  // whatever n is, and no slot's arithmetic depends on how the blocks are shared among the threads.
  at::parallel_for(0, (n + kStepSlots - 1) / kStepSlots, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t block = first_block; block < last_block; ++block)
      step_slots(block * kStepSlots, std::min(n, (block + 1) * kStepSlots));
  });
}

// A row's count of pixels done, alone on its cache line: the threads of the rows before and after
// it write theirs at every pixel.
struct alignas(64) PixelsDone {
  std::atomic<int64_t> count{0};
};

// Waits until `row` of a multi-row call has `columns` pixels done; `seen`: what the caller last saw of it.
inline void wait_for_row(const PixelsDone& row, int64_t columns, int64_t& seen) {
  for (int spins = 0; seen < columns; ++spins) {
    if (spins > 0) {
      if (spins < 1024) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();  // the row's thread is not running: let it
      }
    }
    seen = row.count.load(std::memory_order_acquire);
  }
}

// `rows` whole rows of slots that all start a row, several rows at once. A row call steps a row whose
// rows above are complete; but a pixel's windows reach only p0 columns right of it in the image's rows
// above (the input layer) and p in the blocks' (their masked layers). So here the slots go in groups of
// kStepSlots, as in the step, and each thread takes the next (row, group) nobody has taken, rows in
// order, and steps each of its pixels as soon as the group's row above is that far ahead: a group's rows
// run a few columns apart (at batch 1 the row calls leave all threads but one idle). For the call, each
// block's rows are kept channels last in buffers of their own, not in the channels-first caches (no
// transposes per row): each row is written by one thread and read by the next row's once its count of
// pixels done says so, and the caches get the last rows at the end. Each pixel's sums are the row call's
// (the rows-above part in whole tiles: dense_part), so the bits are the same on any number of threads.
void rows_at_once(const PixelCNNWeights& w, const MaskedSplit& split, const Tensor& pixels, const Tensor& positions,
                  const Tensor& noise, const Tensor& temperature, at::TensorList states, int64_t rows) {
  const int64_t n = positions.size(0), width = pixels.size(3), length = pixels.size(2) * width, h = w.hidden;
  const Tensor& image_rows = states[0];
  const at::TensorList block_rows = states.slice(1);
  check_temperature(temperature, n);
  check_caches(w, split, image_rows, block_rows);
  const int64_t R0 = image_rows.size(2), p0 = R0 - 1, padded0 = width + 2 * p0;
  const int64_t R = split.R, p = split.p, padded = width + 2 * p;
  TORCH_CHECK(image_rows.size(0) == n && image_rows.size(3) == padded0, "image_rows: expected (", n, ", 1, ", R0,
              ", ", padded0, ") for images ", width, " wide, got ", image_rows.sizes());
  if (rows == 0 || n == 0) return;
  const int64_t groups = (n + kStepSlots - 1) / kStepSlots;
  auto group_size = [&](int64_t g) { return std::min(kStepSlots, n - g * kStepSlots); };
  const int64_t part = width < 4 ? width : kTileRows;  // the rows-above part in whole tiles of dense()
  // A row starts at least `lag` columns behind the one above (at a part's start it waits for the part and
  // p columns more; at a pixel, for p0 more), so about width / lag + 1 rows of a group run at once:
  // threads beyond that would only wait.
  const int64_t lag = std::max(part + p, p0 + 1);
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), rows * groups, groups * (width / lag + 1)});
  // The image's rows from p0 above the call's first, (slot, row, column). Each block's rows from p above
  // it in a ring of `ring` rows per group, (group, ring row, block, slot, column, channel), row t where
  // row t - ring was. That row is read by rows up to t - ring + p = t - threads, all done by then: a
  // group's rows are taken in order and end in order (a row's last pixel waits for the row above to end),
  // and each row being stepped holds a thread, so when row t is taken the others being stepped are at
  // most rows t - threads + 1 to t - 1, and every row before them has ended.
  // And each thread's step buffers: taken here, so that nothing in the stepping can fail (a thread that
  // stopped there would leave the next row's waiting forever).
  const int64_t image_slot = (p0 + rows) * padded0, slot_row = w.blocks * padded * h, ring = threads + p;
  const int64_t step_floats = arrays_size(GroupStep::buffer_counts(w, split, kStepSlots, width, width, R0, false));
  const std::array<float*, 3> own = scratch_arrays<3>({n * image_slot, ring * n * slot_row, threads * step_floats});
  float *image = own[0], *features = own[1];
  auto feature_row = [&](int64_t g, int64_t row, int64_t b, int64_t s) {  // `row` of the call's: -p up to rows
    const int64_t m = group_size(g);
    return features + (g * kStepSlots * ring + (row + p) % ring * m) * slot_row + (b * m + s) * padded * h;
  };
  float* image_cache = image_rows.data_ptr<float>();
  auto cache = [&](int64_t b, int64_t slot) { return block_rows[b].data_ptr<float>() + slot * h * R * padded; };
  // The rows above the first: the caches' rows but their first (a row call first moves the caches up a
  // row). The image's rows start as zeros: the masked input layer reads its row right of the pixel (and
  // weighs it by zero). A block's row gets zero padding columns when its (row, group) is taken.
  at::parallel_for(0, n, kStepSlots, [&](int64_t first_slot, int64_t last_slot) {
    for (int64_t slot = first_slot; slot < last_slot; ++slot) {
      std::copy_n(image_cache + (slot * R0 + 1) * padded0, p0 * padded0, image + slot * image_slot);
      std::fill_n(image + slot * image_slot + p0 * padded0, rows * padded0, 0.f);
      for (int64_t b = 0; b < w.blocks; ++b)
        for (int64_t r = 0; r < p; ++r)
          transpose(cache(b, slot) + (r + 1) * padded, R * padded,
                    feature_row(slot / kStepSlots, r - p, b, slot % kStepSlots), h, h, padded);
    }
  });
  int64_t* pos = positions.data_ptr<int64_t>();
  const float* all_noise = noise.data_ptr<float>();
  const float* temp = temperature.data_ptr<float>();
  uint8_t* images = pixels.data_ptr<uint8_t>();
  const std::unique_ptr<PixelsDone[]> done(new PixelsDone[rows * groups]);  // per (row, group)
  std::atomic<int64_t> next{0};
  auto step_rows = [&](int64_t thread) {
    const int64_t first[kStepSlots] = {};
    int64_t column[kStepSlots];
    for (int64_t taken; (taken = next.fetch_add(1)) < rows * groups;) {
      const int64_t t = taken / groups, g = taken % groups, m = group_size(g), slot0 = g * kStepSlots;
      GroupStep group(w, split, m, width, width, R0, false, own[2] + thread * step_floats);
      for (int64_t b = 0; b < w.blocks; ++b)
        for (int64_t s = 0; s < m; ++s) {
          std::fill_n(feature_row(g, t, b, s), p * h, 0.f);
          std::fill_n(feature_row(g, t, b, s) + (p + width) * h, p * h, 0.f);
        }
      int64_t seen = 0;  // of the row above's pixels done
      for (int64_t j = 0; j < width; ++j) {
        if (j % part == 0) {
          const int64_t last = std::min(j + part, width);
          if (t > 0) wait_for_row(done[taken - groups], std::min(last + p, width), seen);
          group.above_part(j, last, first, [&](int64_t b, int64_t s, int64_t r) {
            return feature_row(g, t - p + r, b, s);
          });
        }
        if (t > 0) wait_for_row(done[taken - groups], std::min(j + p0 + 1, width), seen);
        std::fill_n(column, m, j);
        group.pixel(j, column, true, image + slot0 * image_slot + t * padded0, image_slot, feature_row(g, t, 0, 0),
                    [&](int64_t s, const float* logits) {
                      const int64_t at = (slot0 + s) * length + pos[slot0 + s] + t * width + j;
                      const int64_t level = choose_level(logits, w.levels, all_noise[at], temp[slot0 + s]);
                      images[at] = static_cast<uint8_t>(level);
                      return level;
                    });
        done[taken].count.store(j + 1, std::memory_order_release);
      }
    }
  };
  // A thread waits only on the row before its own, which another took earlier and steps meanwhile (or
  // it did itself): the call ends on any number of threads, even one that takes every row.
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t thread = first; thread < last; ++thread) step_rows(thread);
  });
  // The caches as the last row call leaves them: each its last R0 or R rows; the positions a row on per row.
  at::parallel_for(0, n, kStepSlots, [&](int64_t first_slot, int64_t last_slot) {
    for (int64_t slot = first_slot; slot < last_slot; ++slot) {
      pos[slot] += rows * width;
      std::copy_n(image + slot * image_slot + (rows - 1) * padded0, R0 * padded0, image_cache + slot * R0 * padded0);
      for (int64_t b = 0; b < w.blocks; ++b)
        for (int64_t r = 0; r < R; ++r)
          transpose(feature_row(slot / kStepSlots, rows - R + r, b, slot % kStepSlots), h,
                    cache(b, slot) + r * padded, R * padded, padded, h);
    }
  });
}

// The rows each residual block's cache holds (R = p + 1); 1 where there are no blocks.
int64_t block_cache_rows(at::TensorList block_rows) {
  if (block_rows.empty()) return 1;
  TORCH_CHECK(block_rows[0].dim() == 4, "block rows: expected (n, h, R, W + 2p) tensors, got ", block_rows[0].sizes());
  return block_rows[0].size(2);
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
            out[0], out.back(), MaskedSplit(w, block_cache_rows(block_rows)));
  return out;
}

void check_states(const PixelCNNWeights& w, at::TensorList states) {
  TORCH_CHECK(static_cast<int64_t>(states.size()) == w.blocks + 1, "states: image_rows and one cache per block");
}

// A whole row for slots that all start one: the caches roll up a row and the step runs, in place
// on `states` (image_rows, then each block's rows). Returns the pixels.
Tensor row_in_place(const PixelCNNWeights& w, const MaskedSplit& split, const Tensor& positions, const Tensor& noise,
                    const Tensor& temperature, at::TensorList states) {
  roll_rows(states);
  Tensor image_rows = states[0];
  Tensor pixel = at::empty({positions.size(0), noise.size(1), 1}, positions.options());
  Tensor no_logits = at::empty({0}, image_rows.options());
  step_into(w, positions, noise, temperature, image_rows, states.slice(1), std::nullopt, pixel, no_logits, split);
  return pixel;
}

Tensor pixelcnn_row(const Tensor& positions, const Tensor& noise, const Tensor& temperature, at::TensorList states,
                    at::TensorList weights) {
  const PixelCNNWeights w(weights);
  check_states(w, states);
  return row_in_place(w, MaskedSplit(w, block_cache_rows(states.slice(1))), positions, noise, temperature, states);
}

// `rows` whole rows in one call, stepped at once (rows_at_once): the images and positions advanced in
// place, the masked kernels split once. An unconditional family: `labels` is accepted for the engine's
// one signature and must be None.
void pixelcnn_rows(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                   const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights,
                   int64_t rows) {
  TORCH_CHECK(!labels.has_value(), "labels: PixelCNN is unconditional");
  const PixelCNNWeights w(weights);
  check_states(w, states);
  const MaskedSplit split(w, block_cache_rows(states.slice(1)));
  check_rows(pixels, positions, noise, rows);
  rows_at_once(w, split, pixels, positions, noise, temperature, states, rows);
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
