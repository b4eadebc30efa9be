// The resident Gated step (gated_resident.cuh) on CPU threads: the kernel a GPU runs, each block's
// threads real threads (device.h), so that tests check it where no GPU is. Not for serving: every
// barrier is a mutex, and a call takes seconds. The CUDA implementation is resident_cuda.cpp's.
#include <torch/library.h>

#include "gated_resident.cuh"
#include "gated_resident_op.h"

namespace genserve {
namespace {

void gated_step_resident(const at::Tensor& positions, const at::Tensor& noise, const at::Tensor& temperature,
                         const at::Tensor& links, const at::Tensor& image_context, const at::Tensor& hidden_context,
                         const std::optional<at::Tensor>& teacher, const at::Tensor& pixel, const at::Tensor& logits,
                         at::TensorList weights, int64_t threads, int64_t shared_bytes) {
  const ResidentGatedStep a = resident_arguments(positions, noise, temperature, links, image_context, hidden_context,
                                                 teacher, pixel, logits, weights, threads, shared_bytes,
                                                 kH100SharedBytes);
  emulation::launch(a.io.n, static_cast<int>(threads), static_cast<size_t>(shared_bytes), gated_step_resident_kernel, a);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("gated_step_resident(Tensor positions, Tensor noise, Tensor temperature, Tensor links,"
        " Tensor(a!) image_context, Tensor(b!) hidden_context, Tensor? teacher, Tensor(c!) pixel, Tensor(d!) logits,"
        " Tensor[] weights, int threads, int shared_bytes) -> ()");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) { m.impl("gated_step_resident", &gated_step_resident); }

}  // namespace genserve
