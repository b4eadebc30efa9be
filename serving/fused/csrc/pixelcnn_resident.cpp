// The resident PixelCNN step (pixelcnn_resident.cuh) on CPU threads: the kernel a GPU runs, each block's
// threads real threads (device.h), so that tests check it where no GPU is. Not for serving: every
// barrier is a mutex. The CUDA implementation is resident_cuda.cpp's.
#include <torch/library.h>

#include "pixelcnn_resident.cuh"
#include "pixelcnn_resident_op.h"

namespace genserve {
namespace {

void pixelcnn_step_resident(const at::Tensor& positions, const at::Tensor& noise, const at::Tensor& temperature,
                            const at::Tensor& image_rows, at::TensorList block_rows,
                            const std::optional<at::Tensor>& teacher, const at::Tensor& pixel,
                            const at::Tensor& logits, at::TensorList weights, bool roll, int64_t threads,
                            int64_t shared_bytes) {
  const ResidentPixelCNNStep a =
      pixelcnn_resident_arguments(positions, noise, temperature, image_rows, block_rows, teacher, pixel, logits,
                                  weights, roll, threads, shared_bytes, kH100SharedBytes);
  emulation::launch(a.io.n, static_cast<int>(threads), static_cast<size_t>(shared_bytes), pixelcnn_step_resident_kernel,
                    a);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("pixelcnn_step_resident(Tensor positions, Tensor noise, Tensor temperature, Tensor(a!) image_rows,"
        " Tensor(b!)[] block_rows, Tensor? teacher, Tensor(c!) pixel, Tensor(d!) logits, Tensor[] weights, bool roll,"
        " int threads, int shared_bytes) -> ()");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) { m.impl("pixelcnn_step_resident", &pixelcnn_step_resident); }

}  // namespace genserve
