// The resident kernels (gated_resident.cuh, pixelcnn_resident.cuh) on a GPU: the CUDA implementations of
// genserve::gated_step_resident and genserve::pixelcnn_step_resident. Built where PyTorch has CUDA and
// nvcc is present (`genserve build-ops`), with the kernels' launches (resident_launch.cu), into a library
// of its own that is loaded after the CPU one, whose schemas (gated_resident.cpp, pixelcnn_resident.cpp)
// it implements.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>

#include "gated_resident_op.h"
#include "pixelcnn_resident_op.h"
#include "resident_launch.h"

namespace genserve {
namespace {

// A block's opt-in maximum of shared memory on `device` (227 KB on an H100 or H200), which the kernels
// are allowed once per device, on the first call of either: a CUDA graph's capture (the engine's, after a
// first launched call) may forbid the attribute's call.
int64_t allow_most_shared_bytes(int device) {
  static std::mutex mutex;
  static std::map<int, int> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = allowed.find(device);
  if (found != allowed.end()) return found->second;
  int most = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(allow_resident_shared_bytes(most));
  allowed.emplace(device, most);
  return most;
}

void gated_step_resident_cuda(const at::Tensor& positions, const at::Tensor& noise, const at::Tensor& temperature,
                              const at::Tensor& links, const at::Tensor& image_context,
                              const at::Tensor& hidden_context, const std::optional<at::Tensor>& teacher,
                              const at::Tensor& pixel, const at::Tensor& logits, at::TensorList weights,
                              int64_t threads, int64_t shared_bytes) {
  const c10::cuda::CUDAGuard guard(positions.device());
  const ResidentGatedStep a =
      resident_arguments(positions, noise, temperature, links, image_context, hidden_context, teacher, pixel, logits,
                         weights, threads, shared_bytes, allow_most_shared_bytes(positions.device().index()));
  if (a.io.n == 0) return;
  C10_CUDA_CHECK(launch_gated_step_resident(a, static_cast<int>(threads), shared_bytes,
                                            c10::cuda::getCurrentCUDAStream()));
}

void pixelcnn_step_resident_cuda(const at::Tensor& positions, const at::Tensor& noise, const at::Tensor& temperature,
                                 const at::Tensor& image_rows, at::TensorList block_rows,
                                 const std::optional<at::Tensor>& teacher, const at::Tensor& pixel,
                                 const at::Tensor& logits, at::TensorList weights, bool roll, int64_t threads,
                                 int64_t shared_bytes) {
  const c10::cuda::CUDAGuard guard(positions.device());
  const ResidentPixelCNNStep a = pixelcnn_resident_arguments(
      positions, noise, temperature, image_rows, block_rows, teacher, pixel, logits, weights, roll, threads,
      shared_bytes, allow_most_shared_bytes(positions.device().index()));
  if (a.io.n == 0) return;
  C10_CUDA_CHECK(launch_pixelcnn_step_resident(a, static_cast<int>(threads), shared_bytes,
                                               c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(genserve, CUDA, m) {
  m.impl("gated_step_resident", &gated_step_resident_cuda);
  m.impl("pixelcnn_step_resident", &pixelcnn_step_resident_cuda);
}

}  // namespace genserve
