// Fused cached sampling for WaveNet (van den Oord et al. 2016) on the CPU: fast-wavenet's queues.
//
// The same program as the exported step graph (export/wavenet_steps.py), on the same states: per
// sample the input convolution over the last two samples, then every dilated layer over its
// queue's oldest input and the newest, the gate, the residual and skip 1x1s, the output layers and
// the inverse-CDF choice, with nothing dispatched between. The graph advances a queue by copying
// it whole each sample (a 256-dilation layer moves 8,160 floats per sample); here, within a call,
// each queue is a ring, time-major so that an entry's channels lie together, whose oldest entry the
// newest overwrites. The rings are copied from the states at the call's start and back, in the
// states' channel-major, oldest-first order, at its end.
// Weights arrive packed by `genserve export` (export/fused.py), every dense layer as (in, out).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "kernels.h"
#include "rows.h"

namespace genserve {
namespace {

using at::Tensor;

constexpr int64_t kStepSlots = 8;  // slots per task, stepped together sample by sample

// The packed weights, in the order export/fused.py writes them.
struct WaveNetWeights {
  const float *in_w, *in_b, *dilated_w, *dilated_b, *class_bias, *out_w, *out_b, *oh_w, *oh_b, *lg_w, *lg_b;
  int64_t layers, residual, skip, classes, output_channels, levels;

  explicit WaveNetWeights(at::TensorList w) {
    TORCH_CHECK(w.size() == 11, "wavenet weights: expected 11 tensors, got ", w.size());
    for (const Tensor& t : w)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
                  "wavenet weights must be contiguous float32 CPU tensors");
    const float** fields[] = {&in_w, &in_b, &dilated_w, &dilated_b, &class_bias, &out_w,
                              &out_b, &oh_w, &oh_b,      &lg_w,      &lg_b};
    for (size_t i = 0; i < w.size(); ++i) *fields[i] = w[i].data_ptr<float>();
    residual = w[1].size(0);
    layers = w[2].size(0);
    skip = w[5].size(2) - residual;
    classes = w[4].dim() == 3 ? w[4].size(1) : 0;
    output_channels = w[7].size(1);
    levels = w[9].size(1);
    TORCH_CHECK(w[0].size(0) == 2 && w[2].size(1) == 2 * residual && w[2].size(2) == 2 * residual,
                "wavenet weights: single-channel audio and (2R, 2R) dilated kernels only, got ", w[0].sizes(), " and ",
                w[2].sizes());
    TORCH_CHECK(levels >= 2 && levels <= 256, "wavenet weights: 2..256 levels, got ", levels);
  }
  float scale(int64_t level) const { return level_value(level, levels); }
};

// What a call reads and writes, checked once (wavenet_call) and shared by its tasks.
struct StepCall {
  const float *noise, *temperature;
  const int64_t* labels;  // or null
  float* recent;          // (n, 2): the last two samples, scaled, oldest first
  std::vector<float*> queues;
  std::vector<int64_t> dilations;
  int64_t* pixel;
  int64_t n, span;
};

StepCall wavenet_call(const WaveNetWeights& w, const Tensor& noise, const Tensor& temperature,
                      const std::optional<Tensor>& labels, Tensor& recent, at::TensorList queues, Tensor& pixel) {
  check_cpu(noise, at::kFloat, 3, "noise");
  check_cpu(temperature, at::kFloat, 2, "temperature");
  check_cpu(recent, at::kFloat, 3, "recent");
  const int64_t n = noise.size(0), span = noise.size(1);
  TORCH_CHECK(noise.size(2) == 1 && recent.size(0) == n && recent.size(1) == 1 && recent.size(2) == 2,
              "noise, recent: single-channel audio, (n, span, 1) and (n, 1, 2); got ", noise.sizes(), " and ",
              recent.sizes());
  TORCH_CHECK(static_cast<int64_t>(queues.size()) == w.layers, "queues: ", queues.size(), " for ", w.layers,
              " layers");
  StepCall call{noise.data_ptr<float>(), temperature.data_ptr<float>(), nullptr, recent.data_ptr<float>(), {}, {},
                pixel.data_ptr<int64_t>(), n, span};
  for (const Tensor& queue : queues) {
    check_cpu(queue, at::kFloat, 3, "queue");
    TORCH_CHECK(queue.size(0) == n && queue.size(1) == w.residual, "queue: shape ", queue.sizes(),
                " does not match the weights");
    call.queues.push_back(queue.data_ptr<float>());
    call.dilations.push_back(queue.size(2));
  }
  if (w.classes) {
    TORCH_CHECK(labels.has_value(), "labels: a conditional model needs labels");
    check_cpu(*labels, at::kLong, 2, "labels");
    call.labels = labels->data_ptr<int64_t>();
    for (int64_t s = 0; s < n; ++s)
      TORCH_CHECK(call.labels[s] >= 0 && call.labels[s] < w.classes, "labels: ", call.labels[s], " outside [0, ",
                  w.classes, ")");
  } else {
    TORCH_CHECK(!labels.has_value(), "labels: this WaveNet is unconditional");
  }
  return call;
}

// `span` samples of slots b0..b1-1, in place on their states. Within the call a queue of dilation d is a
// ring of d entries of R channels: at the call's sample t its oldest entry is entry t % d, and the newest
// input takes its place. Strided across channels as the states keep them, a 64-slot batch's 256-dilation
// queues touched a cache line per channel, slot and sample (8 MB of queues).
void step_slots(const WaveNetWeights& w, const StepCall& call, int64_t b0, int64_t b1) {
  const int64_t R = w.residual, R2 = 2 * R, S = w.skip, O = w.output_channels, levels = w.levels, m = b1 - b0;
  const int64_t L = w.layers;
  std::vector<int64_t> ring_start(L + 1, 0);  // layer l's rings at rings + ring_start[l] * m * R
  for (int64_t l = 0; l < L; ++l) ring_start[l + 1] = ring_start[l] + call.dilations[l];
  const std::array<float*, 8> buffers = scratch_arrays<8>(
      {m * R, m * R2, m * R2, m * R, m * (R + S), m * S, m * (O + levels), m * R * ring_start[L]});
  float *h = buffers[0], *x = buffers[1], *z = buffers[2], *g = buffers[3], *out = buffers[4], *skips = buffers[5],
        *hidden = buffers[6], *logits = hidden + m * O, *rings = buffers[7];
  auto ring = [&](int64_t l, int64_t s) { return rings + (ring_start[l] * m + s * call.dilations[l]) * R; };
  for (int64_t l = 0; l < L; ++l)  // the states' (R, d), oldest first, into rings (d, R), oldest first
    for (int64_t s = 0; s < m; ++s) {
      const int64_t d = call.dilations[l];
      const float* queue = call.queues[l] + (b0 + s) * R * d;
      float* entries = ring(l, s);
      for (int64_t c = 0; c < R; ++c)
        for (int64_t j = 0; j < d; ++j) entries[j * R + c] = queue[c * d + j];
    }
  float* recent = call.recent + b0 * 2;
  for (int64_t t = 0; t < call.span; ++t) {
    dense(recent, 2, w.in_w, 2, R, w.in_b, h, R, m);
    std::fill_n(skips, m * S, 0.f);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t at = t % call.dilations[l];
      for (int64_t s = 0; s < m; ++s) {
        float* oldest = ring(l, s) + at * R;
        std::copy_n(oldest, R, x + s * R2);
        std::copy_n(h + s * R, R, x + s * R2 + R);
        std::copy_n(h + s * R, R, oldest);  // the newest input takes the oldest's place
      }
      dense(x, R2, w.dilated_w + l * R2 * R2, R2, R2, w.dilated_b + l * R2, z, R2, m);
      if (call.labels)
        for (int64_t s = 0; s < m; ++s) {
          const float* bias = w.class_bias + (l * w.classes + call.labels[b0 + s]) * R2;
          for (int64_t o = 0; o < R2; ++o) z[s * R2 + o] += bias[o];
        }
      gate_rows(z, R2, g, R, R, m);
      dense(g, R, w.out_w + l * R * (R + S), R, R + S, w.out_b + l * (R + S), out, R + S, m);
      for (int64_t s = 0; s < m; ++s) {
        for (int64_t c = 0; c < R; ++c) h[s * R + c] += out[s * (R + S) + c];
        for (int64_t c = 0; c < S; ++c) skips[s * S + c] += out[s * (R + S) + R + c];
      }
    }
    relu_rows(skips, S, S, m);
    dense(skips, S, w.oh_w, S, O, w.oh_b, hidden, O, m);
    relu_rows(hidden, O, O, m);
    dense(hidden, O, w.lg_w, O, levels, w.lg_b, logits, levels, m);
    for (int64_t s = 0; s < m; ++s) {
      const int64_t slot = b0 + s, index = slot * call.span + t;
      const int64_t value = call.pixel[index] = choose_level(logits + s * levels, levels, call.noise[index],
                                                             call.temperature[slot]);
      recent[s * 2] = recent[s * 2 + 1];
      recent[s * 2 + 1] = w.scale(value);
    }
  }
  for (int64_t l = 0; l < L; ++l)  // back into the states: the oldest entry now is entry span % d
    for (int64_t s = 0; s < m; ++s) {
      const int64_t d = call.dilations[l], oldest = call.span % d;
      float* queue = call.queues[l] + (b0 + s) * R * d;
      const float* entries = ring(l, s);
      for (int64_t j = 0; j < d; ++j) {
        const float* entry = entries + ((oldest + j) % d) * R;
        for (int64_t c = 0; c < R; ++c) queue[c * d + j] = entry[c];
      }
    }
}

void run_call(const WaveNetWeights& w, const StepCall& call) {
  const int64_t tasks = (call.n + kStepSlots - 1) / kStepSlots;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task)
      step_slots(w, call, task * kStepSlots, std::min(call.n, (task + 1) * kStepSlots));
  });
}

std::vector<Tensor> wavenet_step(const Tensor& noise, const Tensor& temperature, const std::optional<Tensor>& labels,
                                 const Tensor& recent, at::TensorList queues, at::TensorList weights) {
  const WaveNetWeights w(weights);
  std::vector<Tensor> out{at::empty({noise.size(0), noise.size(1), 1}, noise.options().dtype(at::kLong)),
                          recent.clone()};
  for (const Tensor& queue : queues) out.push_back(queue.clone());
  const StepCall call = wavenet_call(w, noise, temperature, labels, out[1], at::TensorList(out).slice(2), out[0]);
  run_call(w, call);
  return out;
}

// `rows` frames per call (rows.h), the states (recent, then every queue) in place.
void wavenet_rows(const Tensor& pixels, const Tensor& positions, const std::optional<Tensor>& labels,
                  const Tensor& noise, const Tensor& temperature, at::TensorList states, at::TensorList weights,
                  int64_t rows) {
  const WaveNetWeights w(weights);
  TORCH_CHECK(!states.empty(), "states: expected recent, then the queues");
  Tensor recent = states[0];
  Tensor pixel = at::empty({positions.size(0), pixels.size(3), 1}, positions.options());
  for_rows(pixels, positions, noise, rows, [&](const Tensor& step_noise, bool) {
    const StepCall call = wavenet_call(w, step_noise, temperature, labels, recent, states.slice(1), pixel);
    run_call(w, call);
    return pixel;
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("wavenet_step(Tensor noise, Tensor temperature, Tensor? labels, Tensor recent, Tensor[] queues,"
        " Tensor[] weights) -> Tensor[]");
  m.def("wavenet_rows(Tensor(a!) pixels, Tensor(b!) positions, Tensor? labels, Tensor noise, Tensor temperature,"
        " Tensor(c!)[] states, Tensor[] weights, int rows) -> ()");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) {
  m.impl("wavenet_step", &wavenet_step);
  m.impl("wavenet_rows", &wavenet_rows);
}

}  // namespace genserve
